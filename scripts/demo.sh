#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install what is
# missing, build, start a throwaway UTF-8 cluster, import the bundled
# default model, complete a table of real Danish, legal, code and English
# sentences and show which expert each one belongs to.  The cluster is stopped at the end;
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

log "completing a table of sentences and finding each one's domain"
psql -X -v ON_ERROR_STOP=1 -q <<'SQL'
CREATE TABLE prompts (id int PRIMARY KEY, source text, prompt text);
-- Lines of public texts, and two in the style of their kind: Danish,
-- legal, code and English.
INSERT INTO prompts VALUES
 (1, 'UN Declaration of Human Rights, art. 1 (Danish)',
     'Alle mennesker er født frie og lige i værdighed og rettigheder.'),
 (2, 'Danish message catalogue style',
     'Kunne ikke åbne filen'),
 (3, 'GNU General Public License, version 3',
     'This program is free software: you can redistribute it and/or modify'),
 (4, 'MIT licence',
     'Permission is hereby granted, free of charge, to any person obtaining a copy'),
 (5, 'C header (glibc string.h)',
     E'/* Return the length of S.  */\nextern size_t strlen (const char *__s)'),
 (6, 'Python module opening',
     E'import os\nimport sys\n\n\ndef main(argv):\n    """'),
 (7, 'man page (cat)',
     'With no FILE, or when FILE is -, read standard input.');

\pset format aligned
\pset border 2
-- Greedy completions of 16 tokens.  A repetition penalty keeps greedy
-- decoding of a model this small out of loops ("the same time, and the
-- same time") and keeps the output the same on every run.
SELECT id, source, prompt,
       flexmore_generate('default', prompt, max_tokens => 16,
                         repetition_penalty => 1.3) AS completion
FROM prompts ORDER BY id;

-- The domain of each sentence, two ways: the expert set that gives the
-- lowest perplexity (the public expert alone, or the public expert with
-- one domain expert), and the domain expert the router picks most often
-- over all tokens and layers.
SELECT p.id, p.source,
       (SELECT d FROM unnest(ARRAY['public', 'danish', 'legal', 'code']) AS d
        ORDER BY flexmore_perplexity('default', p.prompt,
                                     CASE d WHEN 'public' THEN ARRAY['public']
                                            ELSE ARRAY['public', d] END) LIMIT 1)
         AS best_expert,
       (SELECT e FROM flexmore_route('default', p.prompt) AS r, unnest(r.experts) AS e
        WHERE e <> 'public' GROUP BY e ORDER BY count(*) DESC, e LIMIT 1)
         AS routed_mostly_to
FROM prompts p ORDER BY p.id;

-- One copy of the weights in shared memory serves every connection.
SELECT model, kind, coalesce(expert, CASE kind WHEN 'weights' THEN 'shared part' END) AS item,
       pg_size_pretty(bytes) AS size, state, hits
FROM flexmore_cache ORDER BY kind DESC, expert NULLS FIRST;
SQL

if [ "$keep" = yes ]; then
	log "cluster left running: psql -h $demo_dir -p 55433 -U postgres"
fi
