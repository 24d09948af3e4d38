// Builds the conformance corpus: one JSON string literal per line, taken
// from text files every Debian 12 system with the test's packages has.
// Usage: node build-corpus.js PO_DIR > corpus.jsonl, where PO_DIR contains the
// Danish message catalogues already converted by msgunfmt.  Files are read
// in sorted order with fixed caps, so one machine always gets one corpus.
'use strict';

const fs = require('fs');
const path = require('path');
const zlib = require('zlib');

const MAX_TEXT = 2000;  // characters per text, so one odd file cannot dominate
const texts = [];

function sortedFiles(dir, filter) {
  let names;
  try {
    names = fs.readdirSync(dir);
  } catch (e) {
    return [];
  }
  return names.sort().map((n) => path.join(dir, n))
    .filter((p) => fs.statSync(p).isFile() && filter(p));
}

function readText(file) {
  const data = fs.readFileSync(file);
  return (file.endsWith('.gz') ? zlib.gunzipSync(data) : data).toString('utf8');
}

// Adds texts of up to linesPerText consecutive lines, at most perFile per
// file and total over the group, skipping texts that are only whitespace.
function addChunks(files, linesPerText, perFile, total) {
  let added = 0;
  for (const file of files) {
    const lines = readText(file).split('\n');
    let fromFile = 0;
    for (let i = 0; i < lines.length && fromFile < perFile && added < total;
         i += linesPerText) {
      const text = lines.slice(i, i + linesPerText).join('\n').slice(0, MAX_TEXT);
      if (text.trim() === '')
        continue;
      texts.push(text);
      fromFile++;
      added++;
    }
  }
  return added;
}

// Decodes the C-style escapes of a PO string literal.
function unescapePo(s) {
  const simple = { n: '\n', t: '\t', r: '\r', '"': '"', '\\': '\\', a: '\x07', b: '\b',
                   f: '\f', v: '\v' };
  return s.replace(/\\([0-7]{1,3}|.)/g, (m, c) =>
    /^[0-7]/.test(c) ? String.fromCharCode(parseInt(c, 8)) : (simple[c] ?? c));
}

// The translated strings (msgstr) of one msgunfmt output file.
function poTranslations(file) {
  const result = [];
  let current = null;
  for (const line of readText(file).split('\n')) {
    const start = /^msgstr(\[\d+\])? "(.*)"$/.exec(line);
    const more = /^"(.*)"$/.exec(line);
    if (start) {
      if (current !== null)
        result.push(current);
      current = unescapePo(start[2]);
    } else if (more && current !== null) {
      current += unescapePo(more[1]);
    } else if (current !== null) {
      result.push(current);
      current = null;
    }
  }
  if (current !== null)
    result.push(current);
  // the first entry of a catalogue is its header, not a translation
  return result.filter((t) => t !== '' && !t.startsWith('Project-Id-Version:'));
}

function addPo(files, perFile, total) {
  let added = 0;
  for (const file of files) {
    let fromFile = 0;
    for (const t of poTranslations(file)) {
      if (fromFile >= perFile || added >= total)
        break;
      texts.push(t.slice(0, MAX_TEXT));
      fromFile++;
      added++;
    }
  }
  return added;
}

const poDir = process.argv[2];
const counts = {};
counts.danishMessages = addPo(sortedFiles(poDir, (p) => p.endsWith('.po')), 80, 3500);
counts.danishMan = 0;
const manRoot = '/usr/share/man/da';
const manSections = fs.existsSync(manRoot) ? fs.readdirSync(manRoot).sort() : [];
for (const section of manSections)
  counts.danishMan += addChunks(sortedFiles(path.join(manRoot, section), () => true),
                                3, 20, 400 - counts.danishMan);
counts.licenses = addChunks(sortedFiles('/usr/share/common-licenses', () => true), 4, 150, 1600);
const copyrights = fs.readdirSync('/usr/share/doc').sort()
  .map((d) => path.join('/usr/share/doc', d, 'copyright'))
  .filter((p) => fs.existsSync(p) && fs.statSync(p).isFile());
counts.copyright = addChunks(copyrights, 3, 6, 600);
counts.headers = addChunks(sortedFiles('/usr/include', (p) => p.endsWith('.h')), 4, 40, 1600);

for (const t of texts)
  process.stdout.write(JSON.stringify(t) + '\n');
process.stderr.write(`corpus: ${texts.length} texts ${JSON.stringify(counts)}\n`);
