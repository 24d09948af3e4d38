#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install what is
# missing, build, start a throwaway UTF-8 cluster, import the bundled
# default model, generate completions for a table of real Danish and English
# prompts and print them side by side.  The cluster is stopped at the end;
# pass --keep to leave it running (its socket is printed).
source "$(dirname "$0")/lib.sh"

keep=no
[ "${1:-}" = --keep ] && keep=yes

install_packages
build_install

demo_dir=/tmp/flexmore-demo
log "starting a throwaway cluster in $demo_dir"
cluster_start "$demo_dir" 55433 UTF8 C.UTF-8 \
	"-c shared_preload_libraries=flexmore -c flexmore.cache_size=256MB"
[ "$keep" = yes ] || trap 'cluster_stop "$demo_dir"' EXIT

model_dir="$(pg_config --sharedir)/flexmore/models/default"
log "importing the bundled default model from $model_dir"
psql -X -v ON_ERROR_STOP=1 -q <<SQL
CREATE EXTENSION flexmore;
SELECT flexmore_import('default', '$model_dir') AS model_id;
SELECT name, architecture, hidden_size, layers, experts, parameters,
       pg_size_pretty(bytes_stored) AS stored
FROM flexmore_models;
SQL

log "generating completions (greedy, 16 tokens each) and classifying the language; the bundled model has random weights, so neither is meaningful"
psql -X -v ON_ERROR_STOP=1 -q <<'SQL'
CREATE TABLE prompts (id int PRIMARY KEY, lang text, source text, prompt text);
-- Opening words of public-domain texts and official translations.
INSERT INTO prompts VALUES
 (1, 'da', 'UN Declaration of Human Rights, art. 1',
     'Alle mennesker er født frie og lige i værdighed og rettigheder.'),
 (2, 'en', 'UN Declaration of Human Rights, art. 1',
     'All human beings are born free and equal in dignity and rights.'),
 (3, 'da', 'H.C. Andersen, Den grimme ælling',
     'Der var så dejligt ude på landet; det var sommer, kornet stod gult,'),
 (4, 'en', 'Charles Dickens, A Tale of Two Cities',
     'It was the best of times, it was the worst of times,'),
 (5, 'da', 'Danmarks Riges Grundlov, § 3',
     'Den lovgivende magt er hos kongen og folketinget i forening.'),
 (6, 'en', 'GNU General Public License, version 3, preamble',
     'The GNU General Public License is a free, copyleft license for software and other kinds of works.');

\pset format aligned
\pset border 2
SELECT id, lang, prompt,
       flexmore_generate('default', prompt, max_tokens => 16) AS completion,
       flexmore_classify('default', prompt, ARRAY['da', 'en']) AS classified
FROM prompts ORDER BY id;

-- One copy of the weights in shared memory serves every connection.
SELECT model, kind, coalesce(expert, CASE kind WHEN 'weights' THEN 'shared part' END) AS item,
       pg_size_pretty(bytes) AS size, state, hits
FROM flexmore_cache ORDER BY kind DESC, expert NULLS FIRST;
SQL

if [ "$keep" = yes ]; then
	log "cluster left running: psql -h $demo_dir -p 55433 -U postgres"
fi
