// The HTML report's script (inlined into the page by compare.html_report; its hash is the only
// script the page's Content-Security-Policy allows). It builds the large view of one attention head,
// with the tokens as row and column labels, and says which query looks at which key under the mouse.
"use strict";

(() => {
  const dataElement = document.getElementById("attention-data");
  if (!dataElement) return; // a report without attention maps
  const data = JSON.parse(dataElement.textContent);
  const focus = document.getElementById("focus");
  const kinds = [["o", "ours"], ["r", "reference"], ["d", "difference (ours − reference)"]];

  // Like Python's f"{x:.2e}", so numbers read the same as in the table.
  function sci(x) {
    const [mantissa, exponent] = x.toExponential(2).split("e");
    const e = Number(exponent);
    return `${mantissa}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function tokenLabels(className) {
    const box = element("div", className);
    data.tokens.forEach((token, index) => {
      const label = element("span", "label", token);
      label.title = `${index}: ${token}`;
      box.append(label);
    });
    return box;
  }

  function mapFigure(layer, kind, caption) {
    const figure = element("figure");
    figure.append(element("figcaption", "", caption));
    const grid = element("div", "focus-grid");
    grid.append(element("div", "corner"), tokenLabels("cols"), tokenLabels("rows"));
    const map = element("div", `map s${layer}${kind}`);
    map.addEventListener("mousemove", showCell);
    map.addEventListener("mouseleave", clearCell);
    grid.append(map);
    figure.append(grid);
    return figure;
  }

  function showHead(layer, head) {
    const cell = data.focusCell;
    const largest = data.differences[layer][head];
    const isDefault = layer === data.focus[0] && head === data.focus[1];
    focus.replaceChildren();
    const title = element("p", "focus-title");
    title.append(
      element("b", "", `Layer ${data.firstLayer + layer}, head ${head}`),
      `: max |ours − reference| ${sci(largest)}`,
      isDefault ? " (the head where ours and the reference differ most). " : ". ",
      "Click any head below to show it here. ",
    );
    const back = element("a", "", `Back to layer ${data.firstLayer + layer}.`);
    back.href = `#attention-layer-${layer}`;
    title.append(back);
    const maps = element("div", "focus-maps");
    maps.style.cssText = `--t:${cell * data.tokens.length}px; --cell:${cell}px; --heads:${data.heads[layer]}; --h:${head}`;
    for (const [kind, caption] of kinds) maps.append(mapFigure(layer, kind, caption));
    focus.append(title, maps, element("p", "hover", "Hover a cell: its row is the query, its column the key."));
    document.querySelectorAll("button.head.selected").forEach((b) => b.classList.remove("selected"));
    const button = document.querySelector(`button.head[data-layer="${layer}"][data-head="${head}"]`);
    if (button) button.classList.add("selected");
  }

  function showCell(event) {
    const cell = data.focusCell;
    const last = data.tokens.length - 1;
    const key = Math.min(last, Math.max(0, Math.floor(event.offsetX / cell)));
    const query = Math.min(last, Math.max(0, Math.floor(event.offsetY / cell)));
    const masked = data.causal && key > query ? " (forbidden by the causal mask: a later token)" : "";
    focus.querySelector(".hover").textContent =
      `query ${query} “${data.tokens[query]}” looks at key ${key} “${data.tokens[key]}”${masked}`;
    focus.querySelectorAll(".label.hi").forEach((label) => label.classList.remove("hi"));
    focus.querySelectorAll(".rows").forEach((rows) => rows.children[query].classList.add("hi"));
    focus.querySelectorAll(".cols").forEach((cols) => cols.children[key].classList.add("hi"));
  }

  function clearCell() {
    focus.querySelectorAll(".label.hi").forEach((label) => label.classList.remove("hi"));
  }

  document.querySelectorAll("button.head").forEach((button) => {
    button.addEventListener("click", () => {
      showHead(Number(button.dataset.layer), Number(button.dataset.head));
      focus.scrollIntoView({ block: "start" });
    });
  });
  const layers = () => document.querySelectorAll("details.layer");
  document.getElementById("open-all").addEventListener("click", () => layers().forEach((d) => { d.open = true; }));
  document.getElementById("close-all").addEventListener("click", () => layers().forEach((d) => { d.open = false; }));

  showHead(data.focus[0], data.focus[1]);
})();
