/* runner gallery: filters work on the arrays of the data island (with faceted counts), cards are
   built a page at a time as you scroll. Every text from the records goes in through textContent
   or a DOM property, never as markup. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("gallery-data").textContent);
  var N = D.id.length, PAGE = 120, EAGER = 30, FSI = "\u2068", PDI = "\u2069";
  var grid = document.getElementById("grid"), more = document.getElementById("more");
  var bar = document.getElementById("filters"), count = document.getElementById("count");
  var matched = new Int32Array(0), shown = 0, io = null;
  var chips = document.createElement("span");
  bar.insertBefore(chips, count);

  var facets = D.facets.map(function (f) {
    var F = {
      key: f.key, label: f.label, opts: f.opts, order: f.order, hidden: !!f.hidden, bits: f.bits || null,
      total: f.counts || null, v: Int32Array.from(f.v), sel: -1, byValue: new Map(), counts: null, all: 0,
      select: null, options: [], shownText: [], isVar: ["status", "error", "model", "aspect_ratio", "size", "flag",
        "dup", "near"].indexOf(f.key) < 0
    };
    F.allBits = F.bits ? F.bits.reduce(function (a, b) { return a | b; }, 0) : 0;
    f.opts.forEach(function (o, i) { F.byValue.set(o, i); });
    return F;
  });
  var byKey = {};
  facets.forEach(function (F) { byKey[F.key] = F; });

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function num(n) { return Number(n).toLocaleString("en-US"); }
  function money(x) { // the rule `runner report` uses (pricing.usd)
    return x === 0 ? "$0.00" : x < 0.0005 ? "<$0.001" : x >= 1 ? "$" + x.toFixed(2) : "$" + x.toFixed(3);
  }
  function value(key, i) { var F = byKey[key]; return F && F.v[i] >= 0 ? F.opts[F.v[i]] : null; }

  // --- filtering: one pass over the items counts, for every option, the items it would match
  // given the other filters (an item failing exactly one filter counts for that filter's options).
  function matches(F, i) {
    if (F.bits) {
      var b = F.bits[F.sel];
      return b === 0 ? (F.v[i] & F.allBits) === 0 : (F.v[i] & b) !== 0;
    }
    return F.v[i] === F.sel;
  }
  function tally(F, i) {
    F.all++;
    if (F.bits) {
      var m = F.v[i];
      for (var k = 0; k < F.bits.length; k++) {
        if (F.bits[k] === 0 ? (m & F.allBits) === 0 : (m & F.bits[k]) !== 0) F.counts[k]++;
      }
    } else if (F.v[i] >= 0) {
      F.counts[F.v[i]]++;
    }
  }
  function filter() {
    var active = facets.filter(function (F) { return F.sel >= 0; });
    facets.forEach(function (F) { F.counts = new Int32Array(F.opts.length); F.all = 0; });
    var out = new Int32Array(N), n = 0, nf = facets.length, na = active.length;
    for (var i = 0; i < N; i++) {
      var miss = 0, missed = null;
      for (var a = 0; a < na && miss < 2; a++) {
        if (!matches(active[a], i)) { miss++; missed = active[a]; }
      }
      if (miss === 0) {
        out[n++] = i;
        for (var f = 0; f < nf; f++) tally(facets[f], i);
      } else if (miss === 1) {
        tally(missed, i);
      }
    }
    matched = out.subarray(0, n);
  }

  // --- the filter bar
  function optionText(F, k) { return FSI + F.opts[k] + PDI + " (" + num(F.counts[k]) + ")"; }
  facets.forEach(function (F) {
    if (F.hidden || F.opts.length === 0) return;
    var label = el("label");
    label.title = F.label;
    label.appendChild(el("bdi", null, F.label));
    var s = el("select");
    s.setAttribute("data-filter", F.key);
    s.appendChild(el("option", null, "all"));
    s.options[0].value = "";
    F.order.forEach(function (k) {
      var o = el("option");
      o.value = F.opts[k];
      F.options[k] = o;
      s.appendChild(o);
    });
    if (F.order.length < F.opts.length) {
      var note = el("option", null, "(the " + num(F.order.length) + " most frequent of " + num(F.opts.length) + ")");
      note.disabled = true;
      s.appendChild(note);
    }
    s.addEventListener("change", function () {
      F.sel = s.value === "" ? -1 : F.byValue.get(s.value);
      update();
    });
    F.select = s;
    label.appendChild(s);
    bar.insertBefore(label, chips);
  });
  function syncBar() {
    facets.forEach(function (F) {
      if (F.sel >= 0 && F.select && !F.options[F.sel]) { // chosen in the URL, beyond the options offered
        var o = el("option");
        o.value = F.opts[F.sel];
        F.options[F.sel] = o;
        F.select.appendChild(o);
      }
      if (!F.select) return;
      F.select.value = F.sel >= 0 ? F.opts[F.sel] : "";
      F.select.classList.toggle("active", F.sel >= 0);
      var first = "all (" + num(F.all) + ")";
      if (F.select.options[0].textContent !== first) F.select.options[0].textContent = first;
      F.options.forEach(function (o, k) {
        if (!o) return;
        var n = F.counts[k];
        if (F.shownText[k] !== n) { o.textContent = optionText(F, k); F.shownText[k] = n; }
        o.disabled = n === 0 && k !== F.sel;
      });
    });
    chips.textContent = "";
    var any = false;
    facets.forEach(function (F) {
      if (F.sel < 0) return;
      any = true;
      if (!F.hidden) return;
      var chip = el("button", "chip", F.label + " " + F.opts[F.sel] + " (" + num(F.total[F.sel]) + ") \u2715");
      chip.type = "button";
      chip.title = "show all again";
      chip.addEventListener("click", function () { F.sel = -1; update(); });
      chips.appendChild(chip);
    });
    if (any) {
      var clear = el("button", "chip", "clear filters");
      clear.type = "button";
      clear.addEventListener("click", function () { facets.forEach(function (F) { F.sel = -1; }); update(); });
      chips.appendChild(clear);
    }
  }

  // --- the filters live in the URL's #fragment, so a filtered view can be bookmarked and shared
  function readHash() {
    var q = new URLSearchParams(location.hash.slice(1));
    facets.forEach(function (F) {
      var v = q.get(F.key);
      F.sel = v !== null && F.byValue.has(v) ? F.byValue.get(v) : -1;
    });
  }
  function writeHash() {
    var q = new URLSearchParams();
    facets.forEach(function (F) { if (F.sel >= 0) q.set(F.key, F.opts[F.sel]); });
    var s = q.toString();
    try { history.replaceState(null, "", s ? "#" + s : location.href.split("#")[0]); } catch (e) { /* some file: URLs refuse */ }
  }

  // --- cards
  function onLoad() { this.setAttribute("data-loaded", "1"); }
  function onError() {
    this.setAttribute("data-loaded", "0");
    var card = this.closest(".card");
    if (this.parentNode.classList.contains("out")) card.classList.add("broken");
    else this.parentNode.classList.add("missing");
  }
  // The first screenful loads eagerly: a lazy image is fetched only once laid out in view, which a
  // plain headless screenshot (taken at the load event) never waits for; the load event does wait
  // for eager images. The rest stay lazy: 100,000 cards must not fetch 100,000 files.
  function image(src, cls, alt, title, eager) {
    var a = el("a", cls);
    a.href = src;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    if (title) a.title = title;
    var img = document.createElement("img");
    img.loading = eager ? "eager" : "lazy";
    img.decoding = eager ? "sync" : "async"; // sync: painted in the first frame after load, not later
    img.alt = alt;
    img.onload = onLoad;
    img.onerror = onError;
    img.src = src;
    a.appendChild(img);
    return a;
  }
  function outputSrc(i) {
    var p = D.img[i], id = D.id[i];
    return typeof p === "number" ? D.base + "images/" + id.slice(0, 2) + "/" + id + "." + D.exts[p] : p;
  }
  function inputsBox(refs, eager) {
    var box = el("div", "inputs");
    box.title = "reference images (" + refs.length + ")";
    refs.slice(0, 2).forEach(function (r) {
      if (r[0]) box.appendChild(image(r[0], "in", "reference image", r[1], eager));
      else box.appendChild(el("span", "ref", r[1]));
    });
    if (refs.length > 2) box.appendChild(el("span", "more-in", "+" + (refs.length - 2)));
    return box;
  }
  function meta(i) {
    var div = el("div", "meta");
    var parts = [D.pids[D.pid[i]], value("model", i), value("aspect_ratio", i), value("size", i)];
    parts.forEach(function (t, k) {
      if (k) div.appendChild(document.createTextNode(" \u00b7 "));
      div.appendChild(el("bdi", null, t));
    });
    var tail = [];
    if (D.rp[i] !== null) tail.push("repeat " + D.rp[i]);
    if (D.sd[i] !== null) tail.push("seed " + D.sd[i]);
    if (D.w[i] && D.h[i]) tail.push(D.w[i] + "\u00d7" + D.h[i]);
    tail.push(money(D.c[i]));
    if (D.a[i] > 1) tail.push(D.a[i] + " attempts");
    div.appendChild(document.createTextNode(" \u00b7 " + tail.join(" \u00b7 ")));
    if (D.r[i] >= 0) {
      div.appendChild(document.createTextNode(" \u00b7 retried "));
      div.appendChild(el("bdi", null, D.retried[D.r[i]]));
    }
    return div;
  }
  function groupButton(key, i, what) {
    var F = byKey[key];
    if (!F || F.v[i] < 0) return null;
    var others = F.total[F.v[i]] - 1;
    var b = el("button", "flag " + key, what + " of " + num(others) + (others === 1 ? " other" : " others"));
    b.type = "button";
    b.title = "show this group";
    b.addEventListener("click", function () {
      facets.forEach(function (G) { G.sel = -1; });
      F.sel = F.v[i];
      update();
      window.scrollTo(0, 0);
    });
    return b;
  }
  function flags(i) {
    var div = el("div", "flags"), m = D.fl[i];
    [groupButton("dup", i, "duplicate"), groupButton("near", i, "near-duplicate")].forEach(function (b) {
      if (b) div.appendChild(b);
    });
    if (m & 4) {
      var shape = D.w[i] && D.h[i] ? ": " + D.w[i] + "\u00d7" + D.h[i] + " for " + value("aspect_ratio", i) : "";
      div.appendChild(el("span", "flag shape", "wrong shape" + shape));
    }
    if (m & 8) div.appendChild(el("span", "flag uniform", "uniform (one colour)"));
    return div.childNodes.length ? div : null;
  }
  function card(i, eager) {
    var e = D.e[i], edit = D["in"][i] >= 0;
    var fig = el("figure", (e === 0 ? "card" : "card failed") + (edit ? " edit" : ""));
    fig.setAttribute("data-id", D.id[i]);
    var media = el("div", "media");
    if (edit) media.appendChild(inputsBox(D.inputs[D["in"][i]], eager));
    if (e === 0) {
      media.appendChild(image(outputSrc(i), "out", "output image", null, eager));
    } else {
      var box = el("div", "error");
      box.appendChild(el("span", "kind", value("error", i)));
      if (e[0] !== null) box.appendChild(el("span", "status", "HTTP " + e[0]));
      if (e[2]) box.appendChild(el("span", "interrupted", "interrupted: it runs again next time"));
      box.appendChild(el("p", "msg", D.msgs[e[1]]));
      media.appendChild(box);
    }
    fig.appendChild(media);
    var extra = D.extra[String(i)];
    if (extra) {
      var row = el("div", "extra");
      extra.forEach(function (src) { row.appendChild(image(src, "x", "extra image")); });
      fig.appendChild(row);
    }
    var cap = el("figcaption");
    cap.appendChild(el("p", "prompt", D.prompts[D.p[i]]));
    cap.appendChild(meta(i));
    var vars = el("div", "vars");
    facets.forEach(function (F) {
      if (!F.isVar || F.v[i] < 0) return;
      var chip = el("span");
      chip.appendChild(el("bdi", null, F.label));
      chip.appendChild(document.createTextNode(": "));
      chip.appendChild(el("bdi", null, F.opts[F.v[i]]));
      vars.appendChild(chip);
    });
    if (vars.childNodes.length) cap.appendChild(vars);
    var fl = flags(i);
    if (fl) cap.appendChild(fl);
    fig.appendChild(cap);
    return fig;
  }

  function renderPage() {
    var frag = document.createDocumentFragment(), end = Math.min(matched.length, shown + PAGE);
    for (; shown < end; shown++) frag.appendChild(card(matched[shown], shown < EAGER));
    grid.appendChild(frag);
    more.hidden = shown >= matched.length;
    count.textContent = "showing " + num(shown) + " of " + num(matched.length) +
      (matched.length === N ? "" : " matching (" + num(N) + " in all)");
    if (io && !more.hidden) { io.unobserve(more); io.observe(more); } // a fresh look: still near the end?
  }
  function update() {
    writeHash();
    apply();
  }
  function apply() {
    filter();
    syncBar();
    grid.textContent = "";
    shown = 0;
    if (matched.length === 0) grid.appendChild(el("p", "none", "no item matches these filters"));
    renderPage();
  }

  more.addEventListener("click", renderPage);
  if ("IntersectionObserver" in window) {
    io = new IntersectionObserver(function (entries) {
      if (entries.some(function (x) { return x.isIntersecting; }) && !more.hidden) renderPage();
    }, { rootMargin: "1200px" });
  }
  window.addEventListener("hashchange", function () { readHash(); apply(); });
  readHash();
  apply();
  if (window.performance && performance.mark) performance.mark("gallery-first-page");
})();
