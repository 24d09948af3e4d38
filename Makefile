# flexmore: PGXS build of the extension, plus engine-only targets that
# need no server (engine unit tests, the command-line driver).

EXTENSION = flexmore
MODULE_big = flexmore
EXTVERSION = 0.2.0

ENGINE_SRCS = $(wildcard src/engine/*.c)
READER_SRCS = $(wildcard src/reader/*.c)
GLUE_SRCS = $(wildcard src/*.c)
OBJS = $(ENGINE_SRCS:.c=.o) $(READER_SRCS:.c=.o) $(GLUE_SRCS:.c=.o)

DATA = $(wildcard sql/flexmore--*.sql)
REGRESS = $(patsubst sql/%.sql,%,$(filter-out sql/flexmore--%,$(sort $(wildcard sql/*.sql))))
REGRESS_OPTS = --inputdir=. --load-extension=flexmore

DEPS_CFLAGS := $(shell pkg-config --cflags openblas libzstd libpcre2-8)
DEPS_LIBS := $(shell pkg-config --libs openblas libzstd libpcre2-8)

# ---------- shared-cache work: OpenBLAS is not linked into flexmore.so ----------
# Debian's pthread OpenBLAS starts threads when it is loaded, and
# shared_preload_libraries loads flexmore.so into the postmaster, which
# must stay single-threaded.  Backends dlopen OpenBLAS on first use
# (src/blas.c); the standalone build links it (FM_LINK_CBLAS).
MODULE_DEPS_LIBS := $(shell pkg-config --libs libzstd libpcre2-8)

PG_CPPFLAGS = -I$(srcdir)/src $(DEPS_CFLAGS)
PG_CFLAGS = -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = $(MODULE_DEPS_LIBS) -lm -ldl -lpthread

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks no header dependencies, so a changed struct in a header would
# leave stale objects with another layout; every object depends on every
# header instead (the module rebuilds in well under a minute).
HEADERS = $(wildcard src/*.h src/engine/*.h src/reader/*.h)
$(OBJS): $(HEADERS)

# The bundled default model goes to SHAREDIR/flexmore/models/default, where
# flexmore_import (which reads server files) can find it.
MODEL_FILES = $(wildcard models/default/*)
install: install-models
install-models:
	$(MKDIR_P) '$(DESTDIR)$(datadir)/flexmore/models/default'
	$(if $(MODEL_FILES),$(INSTALL_DATA) $(MODEL_FILES) '$(DESTDIR)$(datadir)/flexmore/models/default/')
.PHONY: install-models

# ---------- engine and tools, built without the server ----------

PG_INCLUDEDIR_SERVER := $(shell $(PG_CONFIG) --includedir-server)
PG_PKGLIBDIR_STATIC := $(shell $(PG_CONFIG) --libdir) $(shell $(PG_CONFIG) --pkglibdir)
TOOL_CC = $(CC)
TOOL_CFLAGS = -std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter \
	-Wno-missing-field-initializers -Isrc $(DEPS_CFLAGS) -DFM_LINK_CBLAS
FE_CFLAGS = $(TOOL_CFLAGS) -DFRONTEND -I$(PG_INCLUDEDIR_SERVER)
FE_LIBS = $(addprefix -L,$(PG_PKGLIBDIR_STATIC)) -lpgcommon -lpgport $(DEPS_LIBS) -lm -lpthread

BUILD = build
ENGINE_OBJS = $(patsubst src/%.c,$(BUILD)/%.o,$(ENGINE_SRCS))
READER_OBJS = $(patsubst src/%.c,$(BUILD)/%.o,$(READER_SRCS))

$(BUILD)/engine/%.o: src/engine/%.c src/engine/*.h
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(TOOL_CFLAGS) -c -o $@ $<

$(BUILD)/reader/%.o: src/reader/%.c src/reader/*.h src/engine/*.h
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -c -o $@ $<

$(BUILD)/libfmengine.a: $(ENGINE_OBJS) $(READER_OBJS)
	rm -f $@
	ar rcs $@ $^

ENGINE_TESTS = $(patsubst test/engine/%.c,$(BUILD)/test/%,$(wildcard test/engine/test_*.c))
TOOLS = $(patsubst tools/%.c,$(BUILD)/tools/%,$(wildcard tools/*.c))

$(BUILD)/test/%: test/engine/%.c test/engine/*.h $(BUILD)/libfmengine.a
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -Itest/engine -o $@ $< $(BUILD)/libfmengine.a $(FE_LIBS)

# Checkpoint loading shared by the programs over the engine.
TOOL_COMMON = $(BUILD)/tools/common/checkpoint.o
$(TOOL_COMMON): tools/common/checkpoint.c tools/common/checkpoint.h src/engine/*.h src/reader/*.h
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -Itools -c -o $@ $<

$(BUILD)/tools/%: tools/%.c $(BUILD)/libfmengine.a $(TOOL_COMMON)
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -Itools -o $@ $< $(TOOL_COMMON) $(BUILD)/libfmengine.a $(FE_LIBS)

.PHONY: engine tools engine-check
engine: $(BUILD)/libfmengine.a
tools: $(TOOLS)

# Runs every engine unit test; each prints "N passed, N failed", and the
# last line is their sum.  A program that crashes or fails counts as a
# failure even if its own count line is missing.
engine-check: $(ENGINE_TESTS) $(TOOLS)
	@p=0; f=0; for t in $(ENGINE_TESTS); do \
		echo "== $$t"; \
		out=$$($$t); status=$$?; echo "$$out"; \
		line=$$(echo "$$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1); \
		if [ -n "$$line" ]; then \
			p=$$((p + $${line%% passed*})); n=$${line#*passed, }; f=$$((f + $${n%% failed*})); \
		fi; \
		if [ $$status -ne 0 ] && { [ -z "$$line" ] || [ "$${n%% failed*}" = 0 ]; }; then f=$$((f + 1)); fi; \
	done; \
	echo "$$p passed, $$f failed"; [ $$f -eq 0 ]

# The engine benchmark (bench/engine_bench.c): throughput per weight
# format on a checkpoint directory, memory bandwidth and matrix product
# rates.  Not part of the tests.
ENGINE_BENCH = $(BUILD)/engine-bench
$(ENGINE_BENCH): bench/engine_bench.c $(BUILD)/libfmengine.a $(TOOL_COMMON)
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -Itools -o $@ $< $(TOOL_COMMON) $(BUILD)/libfmengine.a $(FE_LIBS)

.PHONY: engine-bench
engine-bench: $(ENGINE_BENCH)

clean: clean-build
clean-build:
	rm -rf $(BUILD)

# ---------- flexmore-import: the client command (libpq) ----------
# Built by the generic tools rule above, plus libpq, and installed into
# pg_config --bindir next to psql.  PGXS cannot build a PROGRAM and a
# MODULE_big from one Makefile, hence the explicit rules.

PG_INCLUDEDIR_CLIENT := $(shell $(PG_CONFIG) --includedir)
PG_LIBDIR_CLIENT := $(shell $(PG_CONFIG) --libdir)
IMPORT_CLIENT = $(BUILD)/tools/flexmore-import

$(IMPORT_CLIENT): FE_CFLAGS += -I$(PG_INCLUDEDIR_CLIENT)
$(IMPORT_CLIENT): FE_LIBS += -L$(PG_LIBDIR_CLIENT) -lpq

all: $(IMPORT_CLIENT)
install: install-client
install-client: $(IMPORT_CLIENT)
	$(MKDIR_P) '$(DESTDIR)$(bindir)'
	$(INSTALL_PROGRAM) $(IMPORT_CLIENT) '$(DESTDIR)$(bindir)/'
.PHONY: install-client

# ---------- classification benchmark, not part of the tests ----------

# Installs the extension, then runs bench/classify.sh as described there
# (root, a throwaway cluster on port 55461; ROWS and RUNS set its size).
.PHONY: bench-classify
bench-classify: install
	bash bench/classify.sh

# ---------- import benchmark, not part of the tests ----------

# Installs the extension, then runs bench/import.sh as described there
# (root, a throwaway cluster on port 55492; RUNS sets the run count).
.PHONY: bench-import
bench-import: install
	bash bench/import.sh

# ---------- speed benchmark, not part of the tests ----------

# Builds the measurement programs into build/bench, then runs bench/run.sh:
# synthetic checkpoints with FlexOlmo's layer shapes, the engine's decode
# and prompt speed against the measured memory bandwidth and sgemm rate,
# and llama.cpp on the same model (see docs/performance.md).  Needs no
# server and installs nothing.
BENCH_PROGRAMS = $(ENGINE_BENCH) $(BUILD)/bench/membw $(BUILD)/bench/sgemm_timer

$(BUILD)/bench/membw: bench/membw.c
	@mkdir -p $(dir $@)
	$(TOOL_CC) -std=gnu11 -O3 -march=native -Wall -o $@ $< -lpthread

$(BUILD)/bench/sgemm_timer: bench/sgemm_timer.c
	@mkdir -p $(dir $@)
	$(TOOL_CC) -std=gnu11 -O2 -Wall -o $@ $< $(DEPS_CFLAGS) $(DEPS_LIBS)

.PHONY: bench bench-programs
bench-programs: $(BENCH_PROGRAMS)
bench: bench-programs $(BUILD)/tools/flexmore-run
	bash bench/run.sh
