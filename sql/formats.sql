-- flexmore.weight_format: the same model computed with f32, bf16 and q8
-- weights.  Without the shared cache (as pg_regress runs) each backend
-- converts its private copy when the setting changes.  The formats are
-- compared with each other here; test/engine/test_formats.c checks the
-- kernels against float64.

\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('fmt', :'models' || '/flexmore_ranks_f32') > 0 AS imported;

SHOW flexmore.weight_format;
SET flexmore.weight_format = 'int4';
SET flexmore.weight_format = 'fp8';

-- Each format takes its own cache space, so only superusers, or roles
-- granted SET on the parameter, can change it.
CREATE ROLE regress_fmt_user;
SET ROLE regress_fmt_user;
SET flexmore.weight_format = 'q8';
RESET ROLE;
GRANT SET ON PARAMETER flexmore.weight_format TO regress_fmt_user;
SET ROLE regress_fmt_user;
SET flexmore.weight_format = 'q8';
SHOW flexmore.weight_format;
RESET flexmore.weight_format;
RESET ROLE;
REVOKE SET ON PARAMETER flexmore.weight_format FROM regress_fmt_user;
DROP ROLE regress_fmt_user;

CREATE TEMP TABLE fmt_logits (format text, logits real[]);
INSERT INTO fmt_logits SELECT 'f32', flexmore_logits('fmt', flexmore_tokenize('fmt', 'hello world, hello'));
SET flexmore.weight_format = 'bf16';
INSERT INTO fmt_logits SELECT 'bf16', flexmore_logits('fmt', flexmore_tokenize('fmt', 'hello world, hello'));
SET flexmore.weight_format = 'q8';
INSERT INTO fmt_logits SELECT 'q8', flexmore_logits('fmt', flexmore_tokenize('fmt', 'hello world, hello'));
SET flexmore.weight_format = 'f32';
INSERT INTO fmt_logits SELECT 'f32 again', flexmore_logits('fmt', flexmore_tokenize('fmt', 'hello world, hello'));

-- Each format changes the logits a little: at most 5% of the largest f32
-- logit here (an estimate for this model, not a derived bound).
SELECT o.format,
	   o.logits <> f.logits AS differs,
	   (SELECT max(abs(a - b)) < 0.05 * max(abs(b))
		FROM unnest(o.logits, f.logits) AS t(a, b)) AS close_to_f32
FROM fmt_logits o, fmt_logits f
WHERE f.format = 'f32' AND o.format IN ('bf16', 'q8')
ORDER BY o.format;

-- Switching back reloads f32 weights: bitwise the first result.
SELECT (SELECT logits FROM fmt_logits WHERE format = 'f32') =
	   (SELECT logits FROM fmt_logits WHERE format = 'f32 again') AS f32_reloaded;

-- Generation, prompt chunks of more than 8 rows, and scoring in q8.
SET flexmore.weight_format = 'q8';
SELECT length(flexmore_generate('fmt', repeat('hello world ', 6), 4)) > 0 AS generated;
SELECT flexmore_classify('fmt', 'hello world', ARRAY['hello', 'world']) IN ('hello', 'world')
	AS classified;
RESET flexmore.weight_format;

SELECT flexmore_drop_model('fmt');
