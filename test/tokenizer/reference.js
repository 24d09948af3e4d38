// Prints the reference token ids of the Hugging Face tokenizers library
// (npm package "tokenizers") for each input line, in the format of
// flexmore-tokenize: ids separated by spaces, one line per input line.
// Usage: node reference.js TOKENIZER_JSON INPUT, where each input line is a
// JSON string literal.  Special tokens are not added (no BOS), and added
// tokens typed in the text are matched, which is the library's default.
'use strict';

const fs = require('fs');
const { Tokenizer } = require('tokenizers');

async function main() {
  const [tokenizerPath, inputPath] = process.argv.slice(2);
  const tokenizer = Tokenizer.fromFile(tokenizerPath);
  const lines = fs.readFileSync(inputPath, 'utf8').split('\n').filter((l) => l !== '');
  const texts = lines.map((line) => JSON.parse(line));
  const out = [];
  const batch = 256;

  for (let i = 0; i < texts.length; i += batch) {
    const encodings = await tokenizer.encodeBatch(texts.slice(i, i + batch),
                                                  { addSpecialTokens: false });
    for (const encoding of encodings)
      out.push(encoding.getIds().join(' '));
  }
  process.stdout.write(out.join('\n') + '\n');
}

main().catch((e) => {
  console.error(`reference.js: ${e.message}`);
  process.exit(2);
});
