// The search page: text -> images and image -> captions over the same app's JSON API (no external resources).
"use strict";
(function () {
  var $ = function (id) { return document.getElementById(id); };

  function setState(state, count) {
    document.body.setAttribute("data-state", state);
    document.body.setAttribute("data-results", String(count || 0));
  }

  function showError(message) {
    var box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  async function call(url, options) {
    var response = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
    var body = await response.json().catch(function () { return { error: response.statusText }; });
    if (!response.ok) { throw new Error(body.error || ("HTTP " + response.status)); }
    return body;
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function footer(hit) {
    var foot = el("footer");
    foot.appendChild(el("span", { class: "rank" }, "#" + hit.rank));
    foot.appendChild(el("span", { class: "id" }, String(hit.id)));
    foot.appendChild(el("span", { class: "score" }, hit.score.toFixed(4)));
    return foot;
  }

  function matchLine(hit, resultKind) {
    var best = hit.best;
    return el("p", { class: "match" }, "query element " + best.query_element + " \u2194 " + resultKind +
      " element " + best.result_element + " \u00b7 cos " + best.cosine.toFixed(3));
  }

  function imageTile(hit) {
    var tile = el("figure", { class: "tile image", "data-rank": hit.rank, "data-row": hit.row });
    var pair = el("div", { class: "pair" });
    pair.appendChild(el("img", { class: "thumb", src: hit.file, alt: "image " + hit.id }));
    if (hit.attention_map) {
      pair.appendChild(el("img", { class: "attention", src: hit.attention_map,
        alt: "attention of image element " + hit.best.result_element }));
    }
    tile.appendChild(pair);
    tile.appendChild(matchLine(hit, "image"));
    tile.appendChild(footer(hit));
    return tile;
  }

  function captionTile(hit, queryMaps) {
    var tile = el("div", { class: "tile caption", "data-rank": hit.rank, "data-row": hit.row });
    tile.appendChild(el("p", { class: "caption" }, hit.caption || String(hit.id)));
    var map = queryMaps[hit.best.query_element];
    if (map) {
      var pair = el("div", { class: "pair" });
      pair.appendChild(el("img", { class: "attention", src: map,
        alt: "attention of query element " + hit.best.query_element }));
      tile.appendChild(pair);
    }
    tile.appendChild(matchLine(hit, "caption"));
    tile.appendChild(footer(hit));
    return tile;
  }

  function render(answer, makeTile) {
    var grid = $("results");
    grid.replaceChildren.apply(grid, answer.results.map(makeTile));
    setState("done", answer.results.length);
  }

  $("text-form").addEventListener("submit", async function (event) {
    event.preventDefault();
    showError("");
    setState("loading");
    $("query").hidden = true;
    try {
      var answer = await call("/search/text", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: $("text").value, k: Number($("k").value) }),
      });
      render(answer, imageTile);
    } catch (err) { showError(err.message); setState("error"); }
  });

  $("image-form").addEventListener("submit", async function (event) {
    event.preventDefault();
    showError("");
    var file = $("image").files[0];
    if (!file) { showError("choose an image file first"); setState("error"); return; }
    setState("loading");
    var form = new FormData();
    form.append("image", file);
    form.append("k", $("k").value);
    form.append("attention", "true");
    try {
      var answer = await call("/search/image", { method: "POST", body: form });
      var maps = answer.query.attention || [];
      var query = $("query");
      query.replaceChildren(el("span", {}, "query image elements:"));
      maps.forEach(function (src, k) { query.appendChild(el("img", { src: src, alt: "query element " + k })); });
      query.hidden = maps.length === 0;
      render(answer, function (hit) { return captionTile(hit, maps); });
    } catch (err) { showError(err.message); setState("error"); }
  });

  call("/health").then(function (h) {
    var names = { image: "images", text: "captions" };
    var sizes = Object.keys(h.databases).map(function (db) { return h.databases[db] + " " + (names[db] || db); });
    $("meta").textContent = "split " + h.split + " \u00b7 " + sizes.join(", ") + " \u00b7 " + h.similarity.name;
  }).catch(function (err) { showError(err.message); });
}());
