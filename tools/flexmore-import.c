/*-------------------------------------------------------------------------
 *
 * flexmore-import.c
 *	  Client command that imports a checkpoint directory on the client
 *	  machine into a database, with no file access on the server.
 *
 * Everything happens in one transaction: the command creates one large
 * object per checkpoint file (config.json, tokenizer.json, the safetensors
 * file or the index and its shards) and writes the file into it, calls
 * flexmore_import_lo (or flexmore_add_expert_lo with --add-expert), which
 * validates and stores exactly as flexmore_import does, unlinks the large
 * objects and commits.  Any failure, including Ctrl-C, rolls back, so
 * neither a half-imported model nor a stray large object remains.
 *
 * The server holds the checkpoint twice until the commit: once in
 * pg_largeobject and once in the flexmore tables.
 *
 *-------------------------------------------------------------------------
 */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <libpq/libpq-fs.h>

/* Bytes written to a large object per lo_write call. */
#define WRITE_BLOCK (1024 * 1024)

/* Upper bound on the files of a checkpoint the command sends. */
#define MAX_FILES 4096

typedef struct checkpoint_file
{
	char	   *name;
	char	   *path;
	uint64_t	size;
	Oid			oid;
} checkpoint_file;

static const char *progname = "flexmore-import";
static volatile sig_atomic_t interrupted = 0;

static void
on_signal(int sig)
{
	interrupted = 1;
}

static void
usage(void)
{
	printf("Usage: %s [OPTION]... MODEL_NAME CHECKPOINT_DIR\n"
		   "Import a checkpoint directory on this machine into a flexmore database.\n\n"
		   "Options:\n"
		   "  -h, --host=HOST          database server host or socket directory\n"
		   "  -p, --port=PORT          database server port\n"
		   "  -U, --username=USER      database user name\n"
		   "  -d, --dbname=CONNINFO    database name or connection string\n"
		   "  -r, --replace            replace an existing model of the same name\n"
		   "  -e, --add-expert[=NAME]  add the expert of a two-expert package to MODEL_NAME,\n"
		   "                           named NAME (default: the package's own name)\n"
		   "  -q, --quiet              no progress bar\n"
		   "      --help               show this help and exit\n\n"
		   "Connection settings also come from the PGHOST, PGPORT, PGUSER, PGDATABASE\n"
		   "and other libpq environment variables.  The whole import is one transaction.\n",
		   progname);
}

static void
die(PGconn *conn, const char *fmt,...)
__attribute__((format(printf, 2, 3), noreturn));

static void
die(PGconn *conn, const char *fmt,...)
{
	va_list		ap;
	char		message[4096];
	size_t		len;

	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	/* libpq's messages end with a newline */
	len = strlen(message);
	while (len > 0 && message[len - 1] == '\n')
		message[--len] = '\0';
	fprintf(stderr, "%s: %s\n", progname, message);
	if (conn != NULL)
		PQfinish(conn);			/* an open transaction rolls back */
	exit(1);
}

static double
now_seconds(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return tv.tv_sec + tv.tv_usec / 1e6;
}

/* Draws the progress bar on stderr: bytes sent of total, with the rate. */
static void
draw_progress(uint64_t sent, uint64_t total, double started, const char *file)
{
	int			width = 30;
	double		fraction = total > 0 ? (double) sent / total : 1.0;
	int			filled = (int) (fraction * width);
	double		elapsed = now_seconds() - started;
	double		rate = elapsed > 0 ? sent / elapsed / 1e6 : 0;

	fprintf(stderr, "\r[%.*s%*s] %5.1f%% %8.1f MB %7.1f MB/s  %-28.28s",
			filled, "##############################", width - filled, "",
			100.0 * fraction, sent / 1e6, rate, file);
	fflush(stderr);
}

static bool
is_checkpoint_file(const char *name)
{
	size_t		len = strlen(name);

	if (name[0] == '.')
		return false;
	return strcmp(name, "config.json") == 0 ||
		strcmp(name, "tokenizer.json") == 0 ||
		strcmp(name, "model.safetensors.index.json") == 0 ||
		(len > 12 && strcmp(name + len - 12, ".safetensors") == 0);
}

/*
 * Dies unless mode is a regular file's.  A FIFO, device or socket named
 * like a checkpoint file would block the command or never end, and
 * skipping it would only move the error to the server.
 */
static void
check_regular(const char *path, mode_t mode)
{
	const char *type;

	if (S_ISREG(mode))
		return;
	if (S_ISDIR(mode))
		type = "a directory";
	else if (S_ISFIFO(mode))
		type = "a FIFO";
	else if (S_ISSOCK(mode))
		type = "a socket";
	else if (S_ISCHR(mode) || S_ISBLK(mode))
		type = "a device";
	else
		type = "not a regular file";
	die(NULL, "file \"%s\" is not a regular file: it is %s", path, type);
}

/* Lists the checkpoint files of dir, sorted by name. */
static int
list_files(const char *dir, checkpoint_file *files)
{
	DIR		   *d = opendir(dir);
	struct dirent *de;
	int			n = 0;

	if (d == NULL)
		die(NULL, "could not open directory \"%s\": %s", dir, strerror(errno));
	while ((de = readdir(d)) != NULL)
	{
		struct stat st;
		char	   *path;

		if (!is_checkpoint_file(de->d_name))
			continue;
		if (n == MAX_FILES)
			die(NULL, "directory \"%s\" has more than %d checkpoint files", dir, MAX_FILES);
		path = malloc(strlen(dir) + strlen(de->d_name) + 2);
		if (path == NULL)
			die(NULL, "out of memory");
		sprintf(path, "%s/%s", dir, de->d_name);
		if (stat(path, &st) != 0)
			die(NULL, "could not stat file \"%s\": %s", path, strerror(errno));
		check_regular(path, st.st_mode);
		files[n].name = strdup(de->d_name);
		files[n].path = path;
		files[n].size = (uint64_t) st.st_size;
		files[n].oid = 0;
		n++;
	}
	closedir(d);
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && strcmp(files[j - 1].name, files[j].name) > 0; j--)
		{
			checkpoint_file t = files[j];

			files[j] = files[j - 1];
			files[j - 1] = t;
		}
	return n;
}

/* Runs a command that returns no rows, or dies with the server's message. */
static void
run(PGconn *conn, const char *sql)
{
	PGresult   *res = PQexec(conn, sql);

	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die(conn, "%s", PQerrorMessage(conn));
	PQclear(res);
}

/* Copies one file into a new large object; returns its OID. */
static Oid
send_file(PGconn *conn, checkpoint_file *f, uint64_t *sent, uint64_t total,
		  double started, bool progress)
{
	Oid			oid = lo_creat(conn, INV_READ | INV_WRITE);
	int			lo;
	int			fd;
	char	   *buf;
	uint64_t	done = 0;
	struct stat st;
	int			flags;

	if (oid == 0)
		die(conn, "could not create a large object for \"%s\": %s", f->path,
			PQerrorMessage(conn));
	lo = lo_open(conn, oid, INV_WRITE);
	if (lo < 0)
		die(conn, "could not open large object %u: %s", oid, PQerrorMessage(conn));
	/*
	 * O_NONBLOCK keeps open() from waiting for a writer if the file was
	 * replaced by a FIFO since it was listed; fstat() then rejects it.
	 */
	fd = open(f->path, O_RDONLY | O_NONBLOCK);
	if (fd < 0)
		die(conn, "could not open file \"%s\": %s", f->path, strerror(errno));
	if (fstat(fd, &st) != 0)
		die(conn, "could not stat file \"%s\": %s", f->path, strerror(errno));
	if (!S_ISREG(st.st_mode))
	{
		PQfinish(conn);
		check_regular(f->path, st.st_mode);
	}
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
		die(conn, "could not set file flags of \"%s\": %s", f->path, strerror(errno));
	buf = malloc(WRITE_BLOCK);
	if (buf == NULL)
		die(conn, "out of memory");

	for (;;)
	{
		ssize_t		got = read(fd, buf, WRITE_BLOCK);

		if (interrupted)
			die(conn, "interrupted; the transaction was rolled back");
		if (got < 0)
			die(conn, "could not read file \"%s\": %s", f->path, strerror(errno));
		if (got == 0)
			break;
		if (lo_write(conn, lo, buf, (size_t) got) != got)
			die(conn, "could not write large object %u for \"%s\": %s", oid, f->path,
				PQerrorMessage(conn));
		done += (uint64_t) got;
		*sent += (uint64_t) got;
		if (progress)
			draw_progress(*sent, total, started, f->name);
	}
	if (done != f->size)
		die(conn, "file \"%s\" changed size while it was sent", f->path);
	free(buf);
	close(fd);
	if (lo_close(conn, lo) != 0)
		die(conn, "could not close large object %u: %s", oid, PQerrorMessage(conn));
	return oid;
}

/* Appends s to the JSON being built, as a JSON string. */
static void
append_json_string(char *out, size_t cap, const char *s)
{
	size_t		len = strlen(out);

	out[len++] = '"';
	for (; *s && len + 8 < cap; s++)
	{
		unsigned char c = (unsigned char) *s;

		if (c == '"' || c == '\\')
		{
			out[len++] = '\\';
			out[len++] = c;
		}
		else if (c < 0x20)
			len += snprintf(out + len, cap - len, "\\u%04x", c);
		else
			out[len++] = c;
	}
	out[len++] = '"';
	out[len] = '\0';
}

int
main(int argc, char **argv)
{
	static struct option long_options[] = {
		{"host", required_argument, NULL, 'h'},
		{"port", required_argument, NULL, 'p'},
		{"username", required_argument, NULL, 'U'},
		{"dbname", required_argument, NULL, 'd'},
		{"replace", no_argument, NULL, 'r'},
		{"add-expert", optional_argument, NULL, 'e'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 1},
		{NULL, 0, NULL, 0}
	};
	const char *keywords[6];
	const char *values[6];
	int			nkeys = 0;
	bool		replace = false;
	bool		add_expert = false;
	const char *expert_name = NULL;
	bool		quiet = false;
	bool		progress;
	const char *model_name;
	const char *dir;
	checkpoint_file *files;
	int			nfiles;
	uint64_t	total = 0;
	uint64_t	sent = 0;
	double		started;
	PGconn	   *conn;
	PGresult   *res;
	char	   *json;
	size_t		json_cap;
	const char *params[3];
	int			c;

	while ((c = getopt_long(argc, argv, "h:p:U:d:re::q", long_options, NULL)) != -1)
	{
		switch (c)
		{
			case 'h':
				keywords[nkeys] = "host";
				values[nkeys++] = optarg;
				break;
			case 'p':
				keywords[nkeys] = "port";
				values[nkeys++] = optarg;
				break;
			case 'U':
				keywords[nkeys] = "user";
				values[nkeys++] = optarg;
				break;
			case 'd':
				keywords[nkeys] = "dbname";
				values[nkeys++] = optarg;
				break;
			case 'r':
				replace = true;
				break;
			case 'e':
				add_expert = true;
				expert_name = optarg;
				break;
			case 'q':
				quiet = true;
				break;
			case 1:
				usage();
				return 0;
			default:
				fprintf(stderr, "Try \"%s --help\" for more information.\n", progname);
				return 1;
		}
	}
	if (argc - optind != 2)
	{
		fprintf(stderr, "%s: expected MODEL_NAME and CHECKPOINT_DIR\n", progname);
		fprintf(stderr, "Try \"%s --help\" for more information.\n", progname);
		return 1;
	}
	if (add_expert && replace)
		die(NULL, "--replace and --add-expert cannot be combined");
	model_name = argv[optind];
	dir = argv[optind + 1];
	progress = !quiet && isatty(fileno(stderr));

	files = calloc(MAX_FILES, sizeof(checkpoint_file));
	if (files == NULL)
		die(NULL, "out of memory");
	nfiles = list_files(dir, files);
	if (nfiles == 0)
		die(NULL, "directory \"%s\" has no checkpoint files (config.json, tokenizer.json, *.safetensors)",
			dir);
	for (int i = 0; i < nfiles; i++)
		total += files[i].size;

	/* A conninfo string in -d expands into the other settings. */
	keywords[nkeys] = "fallback_application_name";
	values[nkeys++] = progname;
	keywords[nkeys] = NULL;
	values[nkeys] = NULL;
	conn = PQconnectdbParams(keywords, values, 1);
	if (PQstatus(conn) != CONNECTION_OK)
		die(conn, "%s", PQerrorMessage(conn));

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	run(conn, "BEGIN");

	started = now_seconds();
	json_cap = 64;
	for (int i = 0; i < nfiles; i++)
		json_cap += 2 * strlen(files[i].name) + 32;
	json = malloc(json_cap);
	if (json == NULL)
		die(conn, "out of memory");
	strcpy(json, "{");
	for (int i = 0; i < nfiles; i++)
	{
		files[i].oid = send_file(conn, &files[i], &sent, total, started, progress);
		if (i > 0)
			strcat(json, ", ");
		append_json_string(json, json_cap, files[i].name);
		snprintf(json + strlen(json), json_cap - strlen(json), ": %u", files[i].oid);
	}
	strcat(json, "}");
	if (progress)
	{
		draw_progress(sent, total, started, add_expert ? "adding the expert" : "importing");
		fputc('\n', stderr);
	}

	params[0] = model_name;
	params[1] = json;
	if (add_expert)
	{
		params[2] = expert_name;
		res = PQexecParams(conn, "SELECT flexmore_add_expert_lo($1, $2::jsonb, $3)",
						   3, NULL, params, NULL, NULL, 0);
	}
	else
	{
		params[2] = replace ? "true" : "false";
		res = PQexecParams(conn, "SELECT flexmore_import_lo($1, $2::jsonb, $3::boolean)",
						   3, NULL, params, NULL, NULL, 0);
	}
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
	{
		const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);

		/* The server's hint names the SQL argument; name the option too. */
		if (sqlstate != NULL && strcmp(sqlstate, "42710") == 0 && !add_expert)
			die(conn, "%sUse -r (--replace) to import over the existing model.",
				PQerrorMessage(conn));
		die(conn, "%s", PQerrorMessage(conn));
	}
	if (interrupted)
		die(conn, "interrupted; the transaction was rolled back");

	for (int i = 0; i < nfiles; i++)
		if (lo_unlink(conn, files[i].oid) != 1)
			die(conn, "could not unlink large object %u: %s", files[i].oid,
				PQerrorMessage(conn));
	run(conn, "COMMIT");

	if (add_expert)
		printf("added expert %s to model \"%s\" from %d files, %.1f MB in %.1f s\n",
			   PQgetvalue(res, 0, 0), model_name, nfiles, total / 1e6,
			   now_seconds() - started);
	else
		printf("imported model \"%s\" (id %s) from %d files, %.1f MB in %.1f s\n",
			   model_name, PQgetvalue(res, 0, 0), nfiles, total / 1e6,
			   now_seconds() - started);
	PQclear(res);
	PQfinish(conn);
	return 0;
}
