// Runs the Hugging Face tokenizers library (npm package "tokenizers", as
// installed by `npm install` in test/tokenizer/) for the Python tools here.
//
// Usage:
//   node hf_tokenizer.js count TOKENIZER_JSON TEXT_FILE...
//     Writes a JSON object {id: count} of the ids in the encoding of each
//     text file.
//   node hf_tokenizer.js encode TOKENIZER_JSON JSONL_FILE
//     Each input line is a JSON string; writes one JSON array of ids a line.
//   node hf_tokenizer.js decode TOKENIZER_JSON JSONL_FILE
//     Each input line is a JSON array of ids; writes one JSON string a line.
//
// Special tokens are not added, and decoding keeps special tokens.
'use strict';

const fs = require('fs');
const path = require('path');

const { Tokenizer } = require(require.resolve('tokenizers', {
  paths: [path.join(__dirname, '..', '..', 'test', 'tokenizer')],
}));

const CHUNK_CHARS = 1 << 16;
const BATCH = 64;

// Splits text into pieces whose encodings, joined, equal the encoding of
// the whole text.  A cut is made only between "\n" and a character that is
// not whitespace: no alternative of the cl100k Split regex matches across
// such a point, so no pre-token (and so no token) straddles a cut.
function splitAtSafePoints(text) {
  const chunks = [];
  let start = 0;
  while (text.length - start > CHUNK_CHARS) {
    const re = /\n(?=\S)/g;
    re.lastIndex = start + CHUNK_CHARS;
    const match = re.exec(text);
    if (match === null)
      break;
    chunks.push(text.slice(start, match.index + 1));
    start = match.index + 1;
  }
  chunks.push(text.slice(start));
  return chunks;
}

async function encodeAll(tokenizer, texts) {
  const result = [];
  for (let i = 0; i < texts.length; i += BATCH) {
    const encodings = await tokenizer.encodeBatch(texts.slice(i, i + BATCH),
                                                  { addSpecialTokens: false });
    for (const encoding of encodings)
      result.push(encoding.getIds());
  }
  return result;
}

function readJsonLines(file) {
  return fs.readFileSync(file, 'utf8').split('\n')
    .filter((line) => line !== '')
    .map((line) => JSON.parse(line));
}

async function count(tokenizer, files) {
  const counts = {};
  for (const file of files) {
    const chunks = splitAtSafePoints(fs.readFileSync(file, 'utf8'));
    for (const ids of await encodeAll(tokenizer, chunks))
      for (const id of ids)
        counts[id] = (counts[id] || 0) + 1;
  }
  process.stdout.write(JSON.stringify(counts) + '\n');
}

async function encode(tokenizer, file) {
  const ids = await encodeAll(tokenizer, readJsonLines(file));
  process.stdout.write(ids.map((row) => JSON.stringify(row)).join('\n') + '\n');
}

async function decode(tokenizer, file) {
  const out = [];
  for (const ids of readJsonLines(file))
    out.push(JSON.stringify(await tokenizer.decode(ids, false)));
  process.stdout.write(out.join('\n') + '\n');
}

async function main() {
  const [command, tokenizerPath, ...files] = process.argv.slice(2);
  const tokenizer = Tokenizer.fromFile(tokenizerPath);
  if (command === 'count' && files.length > 0)
    await count(tokenizer, files);
  else if (command === 'encode' && files.length === 1)
    await encode(tokenizer, files[0]);
  else if (command === 'decode' && files.length === 1)
    await decode(tokenizer, files[0]);
  else
    throw new Error('usage: node hf_tokenizer.js count|encode|decode ' +
                    'TOKENIZER_JSON FILE...');
}

main().catch((e) => {
  console.error(`hf_tokenizer.js: ${e.message}`);
  process.exit(2);
});
