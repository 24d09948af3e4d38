/*-------------------------------------------------------------------------
 *
 * governance.c
 *	  Who may use which expert: the metadata, enabled flag and consent
 *	  state of flexmore.experts, the grants in flexmore.expert_grants, and
 *	  the mask of experts a call may route to.
 *
 * Every call reads the governance state of its model in its own snapshot,
 * with one read-only query as the extension owner.  A committed grant,
 * revoke, disable or withdrawal therefore takes effect at the next
 * statement of every backend, and there is no cache to invalidate.  The grants are checked
 * against the calling role, read with GetUserId() before the switch to
 * the extension owner, through has_privs_of_role: membership in a
 * grantee counts, PUBLIC (grantee 0) covers every role, and a superuser
 * passes every grant check.  docs/governance.md describes the model.
 *
 *-------------------------------------------------------------------------
 */
#include "flexmore.h"

#include "import.h"

#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"

PG_FUNCTION_INFO_V1(flexmore_expert_set);
PG_FUNCTION_INFO_V1(flexmore_enable_expert);
PG_FUNCTION_INFO_V1(flexmore_disable_expert);
PG_FUNCTION_INFO_V1(flexmore_rename_expert);
PG_FUNCTION_INFO_V1(flexmore_grant_expert);
PG_FUNCTION_INFO_V1(flexmore_revoke_expert);

/* flexmore.expert_access: what a call does with an expert the role may not use. */
typedef enum fm_expert_access
{
	FM_ACCESS_EXCLUDE,
	FM_ACCESS_ERROR
} fm_expert_access;

static const struct config_enum_entry fm_expert_access_options[] = {
	{"exclude", FM_ACCESS_EXCLUDE, false},
	{"error", FM_ACCESS_ERROR, false},
	{NULL, 0, false}
};

static int	flexmore_expert_access = FM_ACCESS_EXCLUDE;

void
fm_governance_define_settings(void)
{
	DefineCustomEnumVariable("flexmore.expert_access",
							 "What a call does with an expert that the calling role may not use.",
							 "exclude leaves the expert out of routing; error raises an error instead.",
							 &flexmore_expert_access,
							 FM_ACCESS_EXCLUDE, fm_expert_access_options,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
}

/* ---------- the mask of a call ---------- */

bool
fm_governance_installed(void)
{
	Oid			schema = get_namespace_oid("flexmore", true);

	return OidIsValid(schema) && OidIsValid(get_relname_relid("expert_grants", schema));
}

static SPIPlanPtr governance_plan = NULL;

/* Why an expert is not usable in a call. */
typedef enum fm_expert_state
{
	FM_EXPERT_USABLE,
	FM_EXPERT_NOT_GRANTED,
	FM_EXPERT_DISABLED,
	FM_EXPERT_WITHDRAWN,
	FM_EXPERT_MISSING			/* no row: changed since the entry was built */
} fm_expert_state;

/*
 * Fills state[num_experts] for the calling role from the experts' rows and
 * grants in the current snapshot.  Runs inside SPI as the extension owner.
 */
static void
fm_governance_read(const fm_cached_model *entry, Oid caller, fm_expert_state *state)
{
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(entry->id)};
	int			rc;

	for (int e = 0; e < entry->num_experts; e++)
		state[e] = FM_EXPERT_MISSING;

	/* Planned once per backend; the plan cache replans after DDL on the tables. */
	if (governance_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare("SELECT e.name, e.enabled, e.consent = 'granted',"
									   " ARRAY(SELECT g.grantee::oid FROM flexmore.expert_grants g"
									   "       WHERE g.model_id = e.model_id AND g.expert_name = e.name)"
									   " FROM flexmore.experts e WHERE e.model_id = $1",
									   1, types);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for the experts of model \"%s\": %s",
				 entry->name, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed for the experts of model \"%s\"", entry->name);
		governance_plan = plan;
	}
	rc = SPI_execute_plan(governance_plan, values, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_with_args failed reading the experts of model \"%s\": %s",
			 entry->name, SPI_result_code_string(rc));

	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tuple, desc, 1);
		bool		isnull;
		bool		enabled = DatumGetBool(SPI_getbinval(tuple, desc, 2, &isnull));
		bool		consented = DatumGetBool(SPI_getbinval(tuple, desc, 3, &isnull));
		ArrayType  *grantees = DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 4, &isnull));
		Datum	   *oids;
		int			n_oids;
		bool		granted = superuser_arg(caller);
		int			e;

		for (e = 0; e < entry->num_experts; e++)
			if (strcmp(entry->expert_names[e], name) == 0)
				break;
		if (e == entry->num_experts)
			continue;

		deconstruct_array(grantees, OIDOID, sizeof(Oid), true, TYPALIGN_INT,
						  &oids, NULL, &n_oids);
		for (int i = 0; i < n_oids && !granted; i++)
		{
			Oid			grantee = DatumGetObjectId(oids[i]);

			granted = (grantee == InvalidOid || has_privs_of_role(caller, grantee));
		}

		/*
		 * A missing grant comes first: a role without access is told that,
		 * not the state of an expert it could not use anyway.
		 */
		if (!granted)
			state[e] = FM_EXPERT_NOT_GRANTED;
		else if (!consented)
			state[e] = FM_EXPERT_WITHDRAWN;
		else if (!enabled)
			state[e] = FM_EXPERT_DISABLED;
		else
			state[e] = FM_EXPERT_USABLE;
	}
}

static const char *
fm_expert_state_reason(fm_expert_state s)
{
	switch (s)
	{
		case FM_EXPERT_NOT_GRANTED:
			return "is not granted to the current role";
		case FM_EXPERT_DISABLED:
			return "is disabled";
		case FM_EXPERT_WITHDRAWN:
			return "has its consent withdrawn";
		case FM_EXPERT_MISSING:
			return "no longer exists";
		case FM_EXPERT_USABLE:
			break;
	}
	return "is usable";
}

void
fm_governance_apply(const fm_cached_model *entry, const bool *named, bool *allowed)
{
	fm_expert_state state[FM_MAX_EXPERTS];
	Oid			caller = GetUserId();
	fm_user_switch sw;
	int			left = 0;
	int			not_granted = 0;
	int			off = 0;

	if (!fm_governance_installed())
	{
		/* version 0.1.0 of the SQL objects: every expert is usable */
		for (int e = 0; e < entry->num_experts; e++)
			allowed[e] = (named == NULL || named[e]);
		return;
	}

	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		fm_governance_read(entry, caller, state);
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();

	for (int e = 0; e < entry->num_experts; e++)
	{
		bool		requested = (named == NULL || named[e]);

		allowed[e] = false;
		if (!requested)
			continue;
		if (state[e] == FM_EXPERT_USABLE)
		{
			allowed[e] = true;
			left++;
			continue;
		}
		if (state[e] == FM_EXPERT_NOT_GRANTED)
			not_granted++;
		else
			off++;

		/*
		 * With experts NULL, an expert that is off for every role is not
		 * part of the request, so only a missing grant raises.
		 */
		if (flexmore_expert_access == FM_ACCESS_ERROR &&
			(named != NULL || state[e] == FM_EXPERT_NOT_GRANTED))
			ereport(ERROR,
					(errcode(state[e] == FM_EXPERT_NOT_GRANTED ?
							 ERRCODE_INSUFFICIENT_PRIVILEGE :
							 ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("expert \"%s\" of model \"%s\" %s",
							entry->expert_names[e], entry->name,
							fm_expert_state_reason(state[e])),
					 errhint(state[e] == FM_EXPERT_NOT_GRANTED ?
							 "Leave the expert out of the experts argument, set flexmore.expert_access to 'exclude', or ask an administrator for flexmore_grant_expert()." :
							 "Leave the expert out of the experts argument; the flexmore_experts view shows which experts are enabled.")));
	}

	if (left == 0)
		ereport(ERROR,
				(errcode(not_granted > 0 ? ERRCODE_INSUFFICIENT_PRIVILEGE :
						 ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no permitted expert left for model \"%s\"", entry->name),
				 errdetail("Requested experts not granted to the current role: %d; disabled or withdrawn: %d.",
						   not_granted, off),
				 not_granted > 0 ?
				 errhint("An administrator grants experts with flexmore_grant_expert(); the flexmore_experts view lists them.") :
				 errhint("The flexmore_experts view shows which experts are disabled or have their consent withdrawn.")));
}

/* ---------- administration ---------- */

/* Runs fn(arg) inside SPI as the extension owner, after the model's name lock. */
static void
fm_governance_as_owner(const char *model_name, void (*fn) (void *), void *arg)
{
	fm_user_switch sw;

	fm_lock_model_name(model_name);
	SPI_connect();
	fm_switch_to_owner(&sw);
	PG_TRY();
	{
		/* a snapshot taken after the lock, as in fm_as_owner (experts.c) */
		PushActiveSnapshot(GetTransactionSnapshot());
		fn(arg);
		PopActiveSnapshot();
	}
	PG_FINALLY();
	{
		fm_restore_user(&sw);
	}
	PG_END_TRY();
	SPI_finish();
}

/* Arguments of one administrative change of an expert. */
typedef struct fm_expert_change
{
	const char *model_name;
	const char *expert_name;
	int64		model_id;		/* set by fm_expert_find */

	/* flexmore_expert_set: NULL leaves a field, "" clears it */
	const char *fields[5];		/* owner, domain, description, licence, consent */

	int			enable;			/* 1 enable, 0 disable, -1 leave */
	const char *new_name;		/* rename */
	Oid			grantee;		/* grant and revoke; InvalidOid is PUBLIC */
	const char *grantee_name;
	bool		grant;
} fm_expert_change;

/* Finds the model and expert of change, raising 42704 when either is missing. */
static void
fm_expert_find(fm_expert_change *c)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	bool		isnull;
	int			rc;

	values[0] = CStringGetTextDatum(c->model_name);
	values[1] = CStringGetTextDatum(c->expert_name);
	rc = SPI_execute_with_args("SELECT m.id, e.name IS NOT NULL FROM flexmore.models m"
							   " LEFT JOIN flexmore.experts e ON e.model_id = m.id AND e.name = $2"
							   " WHERE m.name = $1 FOR NO KEY UPDATE OF m",
							   2, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_with_args failed looking up model \"%s\": %s",
			 c->model_name, SPI_result_code_string(rc));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", fm_quote_name(c->model_name)),
				 errhint("The models that exist are listed in the flexmore_models view.")));
	c->model_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
											  1, &isnull));
	if (!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("expert \"%s\" does not exist in model \"%s\"",
						fm_quote_name(c->expert_name), c->model_name),
				 errhint("The experts of a model are listed in the flexmore_experts view.")));
}

/* Runs one statement over the expert's row; $1 model id, $2 expert name, $3 a value. */
static void
fm_expert_update(fm_expert_change *c, const char *sql, Oid value_type, Datum value,
				 bool value_null, int expected_rc)
{
	Oid			types[3] = {INT8OID, TEXTOID, value_type};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', value_null ? 'n' : ' '};
	int			rc;

	values[0] = Int64GetDatum(c->model_id);
	values[1] = CStringGetTextDatum(c->expert_name);
	values[2] = value;
	rc = SPI_execute_with_args(sql, 3, types, values, nulls, false, 0);
	if (rc != expected_rc)
		elog(ERROR, "SPI_execute_with_args failed (%s): %s", SPI_result_code_string(rc), sql);
}

static void
fm_expert_set_run(void *arg)
{
	static const char *const updates[5] = {
		"UPDATE flexmore.experts SET owner = $3, updated = now() WHERE model_id = $1 AND name = $2",
		"UPDATE flexmore.experts SET domain = $3, updated = now() WHERE model_id = $1 AND name = $2",
		"UPDATE flexmore.experts SET description = $3, updated = now() WHERE model_id = $1 AND name = $2",
		"UPDATE flexmore.experts SET licence = $3, updated = now() WHERE model_id = $1 AND name = $2",
		"UPDATE flexmore.experts SET consent = $3, updated = now() WHERE model_id = $1 AND name = $2"
	};
	fm_expert_change *c = arg;

	fm_expert_find(c);
	for (int f = 0; f < 5; f++)
	{
		const char *v = c->fields[f];

		if (v == NULL)
			continue;
		fm_expert_update(c, updates[f], TEXTOID,
						 v[0] == '\0' ? (Datum) 0 : CStringGetTextDatum(v),
						 v[0] == '\0', SPI_OK_UPDATE);
	}
}

/*
 * flexmore_expert_set(model_name, expert_name, owner, domain, description,
 * licence, consent) sets the given metadata of an expert.  A NULL argument
 * leaves its field unchanged, and an empty string clears it.
 */
Datum
flexmore_expert_set(PG_FUNCTION_ARGS)
{
	fm_expert_change c;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("model_name and expert_name must not be null")));
	memset(&c, 0, sizeof(c));
	c.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	c.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	for (int f = 0; f < 5; f++)
		c.fields[f] = PG_ARGISNULL(f + 2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(f + 2));
	if (c.fields[4] != NULL && strcmp(c.fields[4], "granted") != 0 &&
		strcmp(c.fields[4], "withdrawn") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("consent must be 'granted' or 'withdrawn', not \"%s\"", c.fields[4])));

	PreventCommandIfReadOnly("flexmore_expert_set()");
	fm_check_admin("change an expert");
	fm_governance_as_owner(c.model_name, fm_expert_set_run, &c);
	PG_RETURN_VOID();
}

static void
fm_expert_enable_run(void *arg)
{
	fm_expert_change *c = arg;

	fm_expert_find(c);
	fm_expert_update(c, "UPDATE flexmore.experts SET enabled = $3, updated = now()"
					 " WHERE model_id = $1 AND name = $2",
					 BOOLOID, BoolGetDatum(c->enable == 1), false, SPI_OK_UPDATE);
}

static Datum
fm_expert_enable(FunctionCallInfo fcinfo, bool enable)
{
	fm_expert_change c;

	memset(&c, 0, sizeof(c));
	c.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	c.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	c.enable = enable ? 1 : 0;
	PreventCommandIfReadOnly(enable ? "flexmore_enable_expert()" : "flexmore_disable_expert()");
	fm_check_admin(enable ? "enable an expert" : "disable an expert");
	fm_governance_as_owner(c.model_name, fm_expert_enable_run, &c);
	PG_RETURN_VOID();
}

/* flexmore_enable_expert(model_name, expert_name) returns void. */
Datum
flexmore_enable_expert(PG_FUNCTION_ARGS)
{
	return fm_expert_enable(fcinfo, true);
}

/* flexmore_disable_expert(model_name, expert_name) returns void. */
Datum
flexmore_disable_expert(PG_FUNCTION_ARGS)
{
	return fm_expert_enable(fcinfo, false);
}

/*
 * Renames the expert's row, whose grants follow through ON UPDATE CASCADE,
 * and the matching entry of expert_names in the stored config.  It raises
 * the model's generation, because every backend's cached model contains
 * the names.
 */
static void
fm_expert_rename_run(void *arg)
{
	fm_expert_change *c = arg;
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		values[3];
	int			rc;

	fm_expert_find(c);
	values[0] = Int64GetDatum(c->model_id);
	values[1] = CStringGetTextDatum(c->expert_name);
	values[2] = CStringGetTextDatum(c->new_name);
	rc = SPI_execute_with_args("SELECT 1 FROM flexmore.experts WHERE model_id = $1 AND name = $3",
							   3, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_with_args failed (%s) checking expert \"%s\"",
			 SPI_result_code_string(rc), c->new_name);
	if (SPI_processed > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("expert \"%s\" already exists in model \"%s\"", c->new_name,
						c->model_name)));

	fm_expert_update(c, "UPDATE flexmore.experts SET name = $3, updated = now()"
					 " WHERE model_id = $1 AND name = $2",
					 TEXTOID, values[2], false, SPI_OK_UPDATE);
	fm_expert_update(c, "UPDATE flexmore.models m SET generation = m.generation + 1,"
					 " config = CASE WHEN jsonb_typeof(m.config -> 'expert_names') = 'array'"
					 "   THEN jsonb_set(m.config, ARRAY['expert_names', e.expert_index::text], to_jsonb($3))"
					 "   ELSE m.config END"
					 " FROM flexmore.experts e"
					 " WHERE m.id = $1 AND e.model_id = m.id AND e.name = $3",
					 TEXTOID, values[2], false, SPI_OK_UPDATE);
}

/* flexmore_rename_expert(model_name, expert_name, new_name) returns void. */
Datum
flexmore_rename_expert(PG_FUNCTION_ARGS)
{
	fm_expert_change c;

	memset(&c, 0, sizeof(c));
	c.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	c.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	c.new_name = text_to_cstring(PG_GETARG_TEXT_PP(2));
	fm_check_expert_name(c.new_name);
	PreventCommandIfReadOnly("flexmore_rename_expert()");
	fm_check_admin("rename an expert");
	fm_governance_as_owner(c.model_name, fm_expert_rename_run, &c);
	fm_model_forget(c.model_name);
	PG_RETURN_VOID();
}

static void
fm_expert_grant_run(void *arg)
{
	fm_expert_change *c = arg;

	fm_expert_find(c);
	if (c->grant)
		fm_expert_update(c, "INSERT INTO flexmore.expert_grants (model_id, expert_name, grantee)"
						 " VALUES ($1, $2, $3::regrole) ON CONFLICT DO NOTHING",
						 OIDOID, ObjectIdGetDatum(c->grantee), false, SPI_OK_INSERT);
	else
	{
		fm_expert_update(c, "DELETE FROM flexmore.expert_grants"
						 " WHERE model_id = $1 AND expert_name = $2 AND grantee = $3::regrole",
						 OIDOID, ObjectIdGetDatum(c->grantee), false, SPI_OK_DELETE);
		if (SPI_processed == 0)
			ereport(WARNING,
					(errmsg("expert \"%s\" of model \"%s\" was not granted to %s",
							c->expert_name, c->model_name, c->grantee_name),
					 errdetail("Roles keep what they get through other grants, PUBLIC included; the grantees column of the flexmore_experts view lists them.")));
	}
}

/* Reads the arguments of grant and revoke: PUBLIC (any case) or a role name. */
static Datum
fm_expert_grant(FunctionCallInfo fcinfo, bool grant)
{
	fm_expert_change c;
	char	   *role;

	memset(&c, 0, sizeof(c));
	c.model_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	c.expert_name = text_to_cstring(PG_GETARG_TEXT_PP(1));
	role = text_to_cstring(PG_GETARG_TEXT_PP(2));
	c.grant = grant;
	if (pg_strcasecmp(role, "public") == 0)
	{
		c.grantee = InvalidOid;
		c.grantee_name = "PUBLIC";
	}
	else
	{
		c.grantee = get_role_oid(role, false);
		c.grantee_name = psprintf("role \"%s\"", role);
	}
	PreventCommandIfReadOnly(grant ? "flexmore_grant_expert()" : "flexmore_revoke_expert()");
	fm_check_admin(grant ? "grant an expert" : "revoke an expert");
	fm_governance_as_owner(c.model_name, fm_expert_grant_run, &c);
	PG_RETURN_VOID();
}

/* flexmore_grant_expert(model_name, expert_name, role_name) returns void. */
Datum
flexmore_grant_expert(PG_FUNCTION_ARGS)
{
	return fm_expert_grant(fcinfo, true);
}

/* flexmore_revoke_expert(model_name, expert_name, role_name) returns void. */
Datum
flexmore_revoke_expert(PG_FUNCTION_ARGS)
{
	return fm_expert_grant(fcinfo, false);
}

/* ---------- keeping governance across a re-import ---------- */

/* The governance columns of one expert, as text, and its grantees. */
typedef struct fm_saved_expert
{
	char	   *name;
	char	   *values[7];		/* owner, domain, description, licence, consent, enabled, created */
	int			n_grantees;
	Oid		   *grantees;
} fm_saved_expert;

struct fm_governance_saved
{
	int			n;
	fm_saved_expert *experts;
};

fm_governance_saved *
fm_governance_save(const char *model_name)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model_name)};
	fm_governance_saved *saved = palloc0(sizeof(fm_governance_saved));
	int			rc;

	if (!fm_governance_installed())
		return saved;

	rc = SPI_execute_with_args("SELECT e.name, e.owner, e.domain, e.description, e.licence,"
							   " e.consent, e.enabled::text, e.created::text,"
							   " ARRAY(SELECT g.grantee::oid FROM flexmore.expert_grants g"
							   "       WHERE g.model_id = e.model_id AND g.expert_name = e.name)"
							   " FROM flexmore.experts e JOIN flexmore.models m ON m.id = e.model_id"
							   " WHERE m.name = $1",
							   1, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_with_args failed reading the experts of model \"%s\": %s",
			 model_name, SPI_result_code_string(rc));

	/* copies in the SPI procedure context, which outlives the next query's tuple table */
	saved->n = (int) SPI_processed;
	saved->experts = palloc0(sizeof(fm_saved_expert) * Max(saved->n, 1));
	for (int r = 0; r < saved->n; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		fm_saved_expert *x = &saved->experts[r];
		bool		isnull;
		ArrayType  *grantees;
		Datum	   *oids;

		x->name = SPI_getvalue(tuple, desc, 1);
		for (int c = 0; c < 7; c++)
			x->values[c] = SPI_getvalue(tuple, desc, c + 2);
		grantees = DatumGetArrayTypePCopy(SPI_getbinval(tuple, desc, 9, &isnull));
		deconstruct_array(grantees, OIDOID, sizeof(Oid), true, TYPALIGN_INT,
						  &oids, NULL, &x->n_grantees);
		x->grantees = palloc(sizeof(Oid) * Max(x->n_grantees, 1));
		for (int i = 0; i < x->n_grantees; i++)
			x->grantees[i] = DatumGetObjectId(oids[i]);
	}
	return saved;
}

void
fm_governance_restore(const fm_governance_saved *saved, int64 model_id)
{
	for (int r = 0; r < saved->n; r++)
	{
		const fm_saved_expert *x = &saved->experts[r];
		Oid			types[9] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
		TEXTOID, TEXTOID, TEXTOID};
		Datum		values[9];
		char		nulls[9];
		int			rc;

		values[0] = Int64GetDatum(model_id);
		values[1] = CStringGetTextDatum(x->name);
		nulls[0] = nulls[1] = ' ';
		for (int c = 0; c < 7; c++)
		{
			values[c + 2] = x->values[c] == NULL ? (Datum) 0 : CStringGetTextDatum(x->values[c]);
			nulls[c + 2] = x->values[c] == NULL ? 'n' : ' ';
		}
		rc = SPI_execute_with_args("UPDATE flexmore.experts SET owner = $3, domain = $4,"
								   " description = $5, licence = $6, consent = $7,"
								   " enabled = $8::boolean, created = $9::timestamptz"
								   " WHERE model_id = $1 AND name = $2",
								   9, types, values, nulls, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "SPI_execute_with_args failed restoring expert \"%s\": %s",
				 x->name, SPI_result_code_string(rc));
		if (SPI_processed == 0)
			continue;			/* the new checkpoint has no expert of this name */

		rc = SPI_execute_with_args("DELETE FROM flexmore.expert_grants"
								   " WHERE model_id = $1 AND expert_name = $2",
								   2, types, values, nulls, false, 0);
		if (rc != SPI_OK_DELETE)
			elog(ERROR, "SPI_execute_with_args failed restoring expert \"%s\": %s",
				 x->name, SPI_result_code_string(rc));
		for (int i = 0; i < x->n_grantees; i++)
		{
			Oid			gtypes[3] = {INT8OID, TEXTOID, OIDOID};
			Datum		gvalues[3] = {values[0], values[1], ObjectIdGetDatum(x->grantees[i])};

			rc = SPI_execute_with_args("INSERT INTO flexmore.expert_grants (model_id, expert_name, grantee)"
									   " VALUES ($1, $2, $3::regrole)",
									   3, gtypes, gvalues, NULL, false, 0);
			if (rc != SPI_OK_INSERT)
				elog(ERROR, "SPI_execute_with_args failed restoring a grant of expert \"%s\": %s",
					 x->name, SPI_result_code_string(rc));
		}
	}
}
