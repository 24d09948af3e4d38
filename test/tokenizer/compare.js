// Compares flexmore-tokenize output with the Hugging Face reference ids.
// Usage: node compare.js WORKDIR NAME...; for each NAME it reads
// WORKDIR/NAME.json (the tokenizer), WORKDIR/input.jsonl, WORKDIR/NAME.ref
// (reference.js output), WORKDIR/NAME.default and WORKDIR/NAME.special
// (flexmore-tokenize without and with --allow-special).
//
// Checks per input text and tokenizer:
//  - with allow_special, flexmore's ids equal the reference ids (the
//    library matches added tokens in text by default);
//  - without it, a text that holds no added-token text gets the reference
//    ids, and any text gets no added-token id;
//  - decoding the ids of either mode gives the text back.
// Prints the first mismatches and a final "N passed, N failed" line.
'use strict';

const fs = require('fs');
const path = require('path');

const [workdir, ...names] = process.argv.slice(2);
const inputs = fs.readFileSync(path.join(workdir, 'input.jsonl'), 'utf8')
  .split('\n').filter((l) => l !== '').map((l) => JSON.parse(l));
let passed = 0;
let failed = 0;
let shown = 0;

function readLines(file) {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  if (lines[lines.length - 1] === '')
    lines.pop();
  return lines;
}

// Splits a flexmore-tokenize line into ids and decoded text.
function parseOutput(line) {
  const tab = line.indexOf('\t');
  if (line.startsWith('error\t'))
    return { error: line.slice(tab + 1) };
  return { ids: line.slice(0, tab), decoded: JSON.parse(line.slice(tab + 1)) };
}

function check(ok, name, what, i, detail) {
  if (ok) {
    passed++;
    return;
  }
  failed++;
  if (shown++ < 10)
    console.log(`FAIL ${name} ${what} text ${i} ${JSON.stringify(inputs[i]).slice(0, 200)}\n${detail}`);
}

for (const name of names) {
  const tokenizer = JSON.parse(fs.readFileSync(path.join(workdir, `${name}.json`), 'utf8'));
  const added = tokenizer.added_tokens || [];
  const addedIds = new Set(added.map((t) => t.id));
  const ref = readLines(path.join(workdir, `${name}.ref`));
  const plain = readLines(path.join(workdir, `${name}.default`)).map(parseOutput);
  const special = readLines(path.join(workdir, `${name}.special`)).map(parseOutput);

  if (ref.length !== inputs.length || plain.length !== inputs.length ||
      special.length !== inputs.length) {
    console.log(`FAIL ${name}: ${inputs.length} inputs but ${ref.length} reference, ` +
                `${plain.length} default and ${special.length} allow-special outputs`);
    failed++;
    continue;
  }

  for (let i = 0; i < inputs.length; i++) {
    const text = inputs[i];
    const hasAddedText = added.some((t) => text.includes(t.content));

    check(special[i].ids === ref[i], name, 'allow_special ids', i,
          `  reference: ${ref[i]}\n  flexmore:  ${special[i].ids ?? special[i].error}`);
    if (hasAddedText) {
      const ids = (plain[i].ids ?? '').split(' ').filter((s) => s !== '').map(Number);
      check(plain[i].ids !== undefined && !ids.some((id) => addedIds.has(id)), name,
            'default mode added-token id', i, `  flexmore: ${plain[i].ids ?? plain[i].error}`);
    } else {
      check(plain[i].ids === ref[i], name, 'default ids', i,
            `  reference: ${ref[i]}\n  flexmore:  ${plain[i].ids ?? plain[i].error}`);
    }
    check(plain[i].decoded === text && special[i].decoded === text, name, 'decode round trip', i,
          `  default:       ${JSON.stringify(plain[i].decoded)}\n` +
          `  allow_special: ${JSON.stringify(special[i].decoded)}`);
  }
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
