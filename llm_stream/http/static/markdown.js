// A small Markdown renderer for model output that cannot inject HTML.
//
// It never parses HTML: every element is made with createElement and every piece
// of model text goes in through createTextNode, so "<script>" or "<img onerror>"
// in an answer is shown as those characters. Links are made only for http(s)
// URLs. Handles what chat models write: fenced code (also while still open during
// streaming), headings, lists (nested by indentation), block quotes, rules,
// paragraphs with line breaks, `code`, **bold**, *italics*, [links](https://…)
// and bare https:// URLs. Anything else stays plain text.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w#+.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function el(tag, ...children) {
  const node = document.createElement(tag);
  for (const child of children) {
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function indentOf(line) {
  return line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

/** Renders `text` into a DocumentFragment of safe elements. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const fence = line.match(FENCE);
    if (fence) {
      const marker = fence[1];
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(marker)) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of an answer still streaming)
      const code = el("code", body.join("\n").replace(/\n+$/, ""));
      if (fence[2]) code.dataset.lang = fence[2];
      parent.append(el("pre", code));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      const level = Math.min(heading[1].length + 2, 6); // # is a small heading in a chat bubble
      parent.append(renderInline(heading[2], el(`h${level}`)));
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        body.push(lines[i].replace(QUOTE, ""));
        i += 1;
      }
      const quote = el("blockquote");
      renderBlocks(body, quote);
      parent.append(quote);
      continue;
    }
    if (ITEM.test(line)) {
      i = renderList(lines, i, parent);
      continue;
    }
    const paragraph = [line.trim()];
    i += 1;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    const p = el("p");
    paragraph.forEach((part, n) => {
      if (n) p.append(el("br"));
      renderInline(part, p);
    });
    parent.append(p);
  }
}

// One list from lines[start]: items at the first item's indentation; deeper lines
// (nested lists, continuation text) belong to the item above them.
function renderList(lines, start, parent) {
  const first = lines[start].match(ITEM);
  const indent = indentOf(first[1]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && Number.parseInt(first[2], 10) !== 1) list.start = Number.parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const item = lines[i].match(ITEM);
    if (!item || indentOf(item[1]) !== indent || /\d/.test(item[2]) !== ordered) break;
    const body = [item[3]];
    i += 1;
    while (i < lines.length) {
      const next = lines[i];
      if (!next.trim()) {
        // A blank line ends the list unless more of it (deeper or a sibling) follows.
        const after = lines.slice(i + 1).find((l) => l.trim());
        if (after === undefined || (indentOf(after) <= indent && !ITEM.test(after))) break;
        body.push("");
        i += 1;
        continue;
      }
      const nested = next.match(ITEM);
      if (nested && indentOf(nested[1]) <= indent) break;
      if (!nested && indentOf(next) <= indent && startsBlock(next)) break;
      body.push(next.slice(Math.min(indentOf(next), indent + 2)));
      i += 1;
    }
    const li = el("li");
    renderBlocks(body, li);
    // A tight item is one paragraph: show its text without the paragraph margin.
    if (li.childNodes.length >= 1 && li.firstChild.nodeName === "P") {
      li.firstChild.replaceWith(...li.firstChild.childNodes);
    }
    list.append(li);
  }
  parent.append(list);
  return i;
}

// Inline spans, earliest match first; code spans take their text literally.
const INLINE = [
  { kind: "code", re: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/ },
  { kind: "link", re: /\[([^\]\n]+)\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)/ },
  { kind: "url", re: /\bhttps?:\/\/[^\s<>()"']+[^\s<>()"'.,;:!?*_]/ },
  { kind: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__(?!\w)/ },
  { kind: "em", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|(?<!\w)_(?=\S)([\s\S]*?\S)_(?!\w)/ },
];

function safeUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, label) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return renderInline(label, a, false); // no links inside a link
}

function renderInline(text, parent, links = true) {
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      if (!links && (rule.kind === "link" || rule.kind === "url")) continue;
      const match = rule.re.exec(rest);
      if (match && (best === null || match.index < best.match.index)) best = { rule, match };
    }
    if (best === null) {
      parent.append(document.createTextNode(rest));
      break;
    }
    const { rule, match } = best;
    if (match.index) parent.append(document.createTextNode(rest.slice(0, match.index)));
    if (rule.kind === "code") {
      parent.append(el("code", match[2].replace(/^ (.*) $/, "$1")));
    } else if (rule.kind === "link") {
      const href = safeUrl(match[2]);
      parent.append(href ? link(href, match[1]) : document.createTextNode(match[0]));
    } else if (rule.kind === "url") {
      const href = safeUrl(match[0]);
      const a = href ? link(href, "") : null;
      a?.append(document.createTextNode(match[0]));
      parent.append(a ?? document.createTextNode(match[0]));
    } else {
      parent.append(renderInline(match[1] ?? match[2], el(rule.kind), links));
    }
    rest = rest.slice(match.index + match[0].length);
  }
  return parent;
}
