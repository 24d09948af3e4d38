#!/bin/bash
# The bundled default model, trained by tools/train/train.py.  On the
# held-out sample shipped with it, the perplexities flexmore computes in
# PostgreSQL (all experts, the public expert alone, each domain expert
# opted out) lie within 0.5% of the training framework's figures in
# evaluation.json.  The merged model beats the public model on every
# domain.  Each domain's own expert is among the chosen experts for most
# of the (token, layer) pairs of its whole held-out text.  The checks are in tools/train/evaluate_sql.py.
set -u
. "$(dirname "$0")/common.sh"

here=$(cd "$(dirname "$0")" && pwd)
model_dir="$(pg_config --sharedir)/flexmore/models/default"
out=$(/usr/bin/python3 "$here/../../tools/train/evaluate_sql.py" --check --sample \
	--database flexmore_trained \
	--evaluation "$model_dir/evaluation.json" \
	--heldout "$model_dir/heldout-sample.jsonl" \
	--routing-heldout "$model_dir/heldout.jsonl" \
	--model "flexmore=$model_dir" 2>&1)
status=$?
echo "$out"
last=$(tail -n 1 <<<"$out")
if [[ "$last" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
	passed=${BASH_REMATCH[1]}
	failed=${BASH_REMATCH[2]}
	[ $status -eq 0 ] || [ "$failed" -ne 0 ] || failed=1
else
	passed=0
	failed=1
	echo "evaluate_sql.py printed no count (exit status $status)"
fi
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS flexmore_trained" >/dev/null
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
