-- flexmore_tokenize and flexmore_detokenize.

\getenv models FLEXMORE_TEST_MODELS
SELECT flexmore_import('tok', :'models' || '/flex_olmo_f32') > 0 AS imported;
SELECT flexmore_import('tok_padded', :'models' || '/padded_vocab') > 0 AS imported;

-- Round trips, including whitespace runs, digits and non-ASCII text.
SELECT to_json(s)::text AS s, flexmore_detokenize('tok', flexmore_tokenize('tok', s)) = s AS round_trip
FROM unnest(ARRAY['hello world', E'a\n\nb', E'a\n\n\n\nb', E'x  \n\n  y',
				  E'def f():\n    return 1\n', '   lead', 'trail   ', E'\t\tTab',
				  E'\r\n\r\nz', '1234567', 'In 2024, pi=3.14159 and $1,000,000.00',
				  'rødgrød med fløde på æblerne', 'Ærø Åbenrå', '日本語', '🙂']) AS s;

SELECT flexmore_tokenize('tok', '') AS empty;
SELECT flexmore_detokenize('tok', '{}') AS empty;
SELECT flexmore_tokenize('tok', NULL) IS NULL AS strict_null;

-- Special-token text is ordinary text unless allow_special is true.
SELECT 299 = ANY (flexmore_tokenize('tok', 'a<|endoftext|>b')) AS special_by_default;
SELECT flexmore_tokenize('tok', 'a<|endoftext|>b', allow_special => true) @> ARRAY[299]
	AS special_when_allowed;
SELECT flexmore_detokenize('tok', flexmore_tokenize('tok', 'a<|endoftext|>b')) AS text_kept;
SELECT flexmore_detokenize('tok', flexmore_tokenize('tok', 'a<|endoftext|>b', true)) AS special_kept;

-- Byte-level tokens need not be whole characters: a character cut at the
-- end is dropped, an invalid sequence inside the text becomes U+FFFD.
SELECT array_length(flexmore_tokenize('tok', 'é'), 1) AS e_acute_tokens;
SELECT flexmore_detokenize('tok', (flexmore_tokenize('tok', 'é'))[1:1]) AS cut_at_end;
SELECT flexmore_detokenize('tok', (flexmore_tokenize('tok', 'é'))[1:1] ||
								  flexmore_tokenize('tok', 'a')) AS cut_inside;

-- Invalid ids.
SELECT flexmore_detokenize('tok', ARRAY[-1]);
SELECT flexmore_detokenize('tok', ARRAY[72, 300]);
SELECT flexmore_detokenize('tok', ARRAY[72, NULL]);
SELECT flexmore_detokenize('tok_padded', ARRAY[350]);
SELECT flexmore_detokenize('tok_padded', ARRAY[384]);

-- Unknown model.
SELECT flexmore_tokenize('no such model', 'x');
SELECT flexmore_detokenize('no such model', ARRAY[1]);

SELECT flexmore_drop_model('tok');
SELECT flexmore_drop_model('tok_padded');
