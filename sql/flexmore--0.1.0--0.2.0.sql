-- flexmore 0.1.0 to 0.2.0.  Every object added or changed here must also
-- be in flexmore--0.2.0.sql; test/server/upgrade.sh checks that an updated
-- installation and a fresh one hold the same objects.

\echo Use "ALTER EXTENSION flexmore UPDATE TO '0.2.0'" to load this file. \quit
