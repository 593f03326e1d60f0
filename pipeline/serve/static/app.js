// The map page of `aerial-search serve`: plain JavaScript on Leaflet, talking to the JSON API.
// The whole query state lives in the address's #hash (a permalink); uploads are not part of it.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const PAGE_LIMIT = 500; // threshold mode: results shown at most

  // ---- state <-> #hash ------------------------------------------------------------------------

  const blank = () => ({ uid: null, lonlat: null, pos: [], neg: [], k: 12, threshold: null, diverse: false,
    bbox: null, classifier: false, date: null, changes: null, history: false });
  const RANGE = /^[0-9T:.Z+-]*\/[0-9T:.Z+-]*$/; // FROM/TO, either end may be empty
  let state = blank();
  let upload = null; // {file} while the query is an uploaded image
  let marks = new Map(); // uid -> "positive" | "negative"
  let last = null; // the last results document
  let seq = 0; // searches answered (tests wait on it)

  function encode(s) {
    const p = new URLSearchParams();
    if (s.uid) p.set("uid", s.uid);
    if (s.lonlat) p.set("lonlat", s.lonlat.map((v) => +v.toFixed(7)).join(","));
    if (s.pos.length) p.set("pos", s.pos.join(","));
    if (s.neg.length) p.set("neg", s.neg.join(","));
    if (s.threshold !== null) p.set(s.classifier ? "min_score" : "max_distance", String(s.threshold));
    else p.set("k", String(s.k));
    if (s.diverse) p.set("diverse", "1");
    if (s.classifier) p.set("classifier", "1");
    if (s.bbox) p.set("bbox", s.bbox.map((v) => +v.toFixed(6)).join(","));
    if (s.date) p.set("date", s.date);
    if (s.changes) {
      p.set("changes", "1"); p.set("before", s.changes.before); p.set("after", s.changes.after);
      if (s.changes.robust) p.set("score", "robust");
    }
    if (s.history) p.set("history", "1");
    return p.toString();
  }

  function decode(hash) {
    const p = new URLSearchParams(hash.replace(/^#/, ""));
    const s = blank();
    const list = (v) => (v ? v.split(",").filter((x) => /^\d+$/.test(x)) : []);
    const nums = (v, n) => { const a = (v || "").split(",").map(Number); return a.length === n && a.every(isFinite) ? a : null; };
    s.uid = /^\d+$/.test(p.get("uid") || "") ? p.get("uid") : null;
    s.lonlat = nums(p.get("lonlat"), 2);
    s.pos = list(p.get("pos"));
    s.neg = list(p.get("neg"));
    s.classifier = p.get("classifier") === "1";
    const t = p.get(s.classifier ? "min_score" : "max_distance");
    s.threshold = t !== null && isFinite(+t) ? +t : null;
    if (p.get("k") && +p.get("k") > 0) s.k = Math.round(+p.get("k"));
    s.diverse = p.get("diverse") === "1";
    s.bbox = nums(p.get("bbox"), 4);
    s.date = RANGE.test(p.get("date") || "") ? p.get("date") : null;
    if (p.get("changes") === "1" && RANGE.test(p.get("before") || "") && RANGE.test(p.get("after") || "")) {
      s.changes = { before: p.get("before"), after: p.get("after"), robust: p.get("score") === "robust" };
    }
    s.history = p.get("history") === "1" && Boolean(s.uid || s.lonlat);
    return s;
  }

  const hasQuery = (s) => Boolean(s.uid || s.lonlat || s.pos.length || s.changes);
  // the date fields as FROM/TO (null when both are empty)
  const rangeOf = (from, to) => ($(from).value || $(to).value ? `${$(from).value}/${$(to).value}` : null);
  function setRange(from, to, range) {
    const [a, b] = (range || "/").split("/");
    $(from).value = (a || "").slice(0, 10);
    $(to).value = (b || "").slice(0, 10);
  }

  // ---- the API --------------------------------------------------------------------------------

  async function api(method, path, body, asBlob = false) {
    const opts = { method, headers: {} };
    if (body instanceof FormData) opts.body = body;
    else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
    let resp;
    try { resp = await fetch(path, opts); } catch (e) { throw new Error("the server cannot be reached (" + e.message + ")"); }
    const type = resp.headers.get("content-type") || "";
    const data = type.includes("json") && !(asBlob && resp.ok) ? await resp.json() : await resp.blob();
    if (!resp.ok) throw new Error((data && data.error) || resp.status + " " + resp.statusText);
    return data;
  }

  function settings(s) {
    const o = { diverse: s.diverse, footprints: true };
    if (s.threshold !== null) { o[s.classifier ? "min_score" : "max_distance"] = s.threshold; o.limit = PAGE_LIMIT; }
    else o.k = s.k;
    if (s.bbox) o.bbox = s.bbox.join(",");
    if (s.date) o.date = s.date;
    return o;
  }

  function request(s) {
    if (s.history) { // a place through time: its window in every image covering it, oldest first
      const p = new URLSearchParams({ footprints: "true" });
      if (s.uid) p.set("uid", s.uid);
      else p.set("lonlat", s.lonlat.join(","));
      if (s.date) p.set("date", s.date);
      return ["GET", "/api/history?" + p.toString()];
    }
    if (s.changes) {
      const p = new URLSearchParams({ before: s.changes.before, after: s.changes.after, footprints: "true" });
      if (s.changes.robust) p.set("score", "robust");
      if (s.threshold !== null) { p.set("min_distance", String(s.threshold)); p.set("limit", String(PAGE_LIMIT)); }
      else p.set("k", String(s.k));
      if (s.bbox) p.set("bbox", s.bbox.join(","));
      return ["GET", "/api/changes?" + p.toString()];
    }
    const o = settings(s);
    if (s.pos.length || s.neg.length) {
      return ["POST", "/api/search", Object.assign(o, { positives: s.pos, negatives: s.neg, classifier: s.classifier })];
    }
    const p = new URLSearchParams();
    for (const [key, v] of Object.entries(o)) p.set(key, String(v));
    if (s.uid) p.set("uid", s.uid);
    if (s.lonlat) p.set("lonlat", s.lonlat.join(","));
    return ["GET", "/api/search?" + p.toString()];
  }

  // ---- busy / errors --------------------------------------------------------------------------

  let busy = 0;
  function setBusy(on, text) {
    busy += on ? 1 : -1;
    $("progress").hidden = busy === 0;
    document.body.dataset.busy = busy > 0 ? "1" : "0";
    if (text !== undefined) $("status").textContent = text;
  }
  function showError(msg) { $("error").hidden = !msg; $("error").textContent = msg || ""; }

  // ---- the map --------------------------------------------------------------------------------

  const map = L.map("map", { zoomControl: true, maxZoom: 24, worldCopyJump: false }).setView([20, 0], 2);
  // The basemap is the archive itself, the latest flight on top; it shows the flights the query
  // looks at: those of the date range, or in changes mode the 'after' ones, with the 'before'
  // ones a click away in the layer switch.
  const tileUrl = (range) => "/tiles/{z}/{x}/{y}.png" + (range ? "?date=" + encodeURIComponent(range) : "");
  const tileOptions = { maxZoom: 24, tileSize: 256, attribution: "the archive's own imagery" };
  const basemap = L.tileLayer(tileUrl(null), tileOptions).addTo(map);
  let basemapRange = null;
  let beforeMap = null;
  let flightSwitch = null;
  function rangeLabel(range) {
    const [a, b] = range.split("/");
    return a && b ? `${a} – ${b}` : a ? `from ${a}` : `to ${b}`;
  }
  function showFlights(s) {
    const range = s.changes ? s.changes.after : s.date;
    if (range !== basemapRange) { basemap.setUrl(tileUrl(range)); basemapRange = range; }
    if (flightSwitch) { map.removeControl(flightSwitch); flightSwitch = null; }
    if (beforeMap) { map.removeLayer(beforeMap); beforeMap = null; }
    if (!map.hasLayer(basemap)) basemap.addTo(map);
    if (!s.changes) return;
    beforeMap = L.tileLayer(tileUrl(s.changes.before), tileOptions);
    flightSwitch = L.control.layers({
      [`after: ${rangeLabel(s.changes.after)}`]: basemap,
      [`before: ${rangeLabel(s.changes.before)}`]: beforeMap,
    }, null, { collapsed: false, position: "topright" }).addTo(map);
  }
  const footprintLayer = L.geoJSON(null, {
    style: { color: "#9fd3ff", weight: 1.5, dashArray: "4 3", fill: false, interactive: false },
  }).addTo(map);
  const resultLayer = L.geoJSON(null, {
    style: (f) => (f.properties.role === "query"
      ? { color: "#ffb000", weight: 3, fill: false, className: "query-outline" }
      : { color: "#1f78ff", weight: 2, fillOpacity: 0.08, className: "result-outline" }),
    onEachFeature: (f, layer) => {
      if (f.properties.role !== "result") return;
      layer.bindTooltip(`#${f.properties.rank}`);
      layer.on("click", (ev) => { L.DomEvent.stopPropagation(ev); highlight(f.properties.uid, true); });
    },
  }).addTo(map);
  const outlineOf = new Map(); // uid -> leaflet layer
  const markerLayer = L.layerGroup().addTo(map);
  map.on("zoomend", () => {
    if (map.getZoom() >= 14) map.removeLayer(markerLayer);
    else if (!map.hasLayer(markerLayer)) markerLayer.addTo(map);
  });

  map.on("click", (ev) => {
    const lon = L.Util.wrapNum(ev.latlng.lng, [-180, 180], true);
    upload = null;
    search(Object.assign(keepSettings(), { lonlat: [lon, ev.latlng.lat] }));
  });

  function keepSettings() {
    const s = blank();
    s.k = Math.max(1, Math.min(1000, Math.round(+$("k").value) || 12));
    s.diverse = $("diverse").checked;
    s.classifier = false;
    s.threshold = $("threshold-mode").checked ? +$("threshold").value : null;
    if ($("in-view").checked) s.bbox = viewBox();
    s.date = rangeOf("date-from", "date-to");
    return s;
  }

  function viewBox() {
    const b = map.getBounds();
    return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()];
  }

  function showChanges() {
    const before = rangeOf("before-from", "before-to");
    const after = rangeOf("after-from", "after-to");
    if (!before || !after) return showError("give the 'before' and the 'after' dates (one end of each is enough)");
    const s = keepSettings();
    s.date = null;
    s.threshold = null;
    s.changes = { before, after, robust: $("changes-robust").checked };
    s.bbox = viewBox(); // the current view
    upload = null;
    search(s);
  }

  // ---- searching ------------------------------------------------------------------------------

  async function search(s, push = true) {
    showError("");
    const t0 = performance.now();
    setBusy(true, "searching…");
    try {
      const [method, path, body] = request(s);
      const doc = await api(method, path, body);
      state = s;
      showFlights(s);
      if (push) history.pushState(null, "", "#" + encode(s));
      show(Array.isArray(doc) ? doc[0] : doc, performance.now() - t0);
    } catch (e) {
      showError(e.message);
      $("status").textContent = "";
    } finally {
      setBusy(false);
    }
  }

  async function searchUpload(file) {
    showError("");
    const t0 = performance.now();
    setBusy(true, "fingerprinting and searching " + file.name + "…");
    try {
      const s = keepSettings();
      const p = new URLSearchParams();
      for (const [key, v] of Object.entries(settings(s))) p.set(key, String(v));
      const form = new FormData();
      form.append("file", file, file.name);
      const doc = await api("POST", "/api/search/image?" + p.toString(), form);
      state = s;
      showFlights(s);
      upload = { file };
      history.pushState(null, "", location.pathname + location.search); // uploads are not in permalinks
      show(doc, performance.now() - t0);
    } catch (e) {
      showError(e.message);
      $("status").textContent = "";
    } finally {
      setBusy(false);
    }
  }

  // The example set on the page: the current one (or the query tile as its positive) with the
  // marks applied.
  function currentExamples() {
    const base = (last && last.query) || {};
    const pos = new Set(state.pos.length || state.neg.length ? state.pos : (base.uid ? [base.uid] : []));
    const neg = new Set(state.neg);
    for (const [uid, m] of marks) {
      if (m === "positive") { pos.add(uid); neg.delete(uid); } else { neg.add(uid); pos.delete(uid); }
    }
    return { pos, neg };
  }

  function rerunWithMarks() {
    const base = last && last.query;
    if (!base) return showError("search first: click the map or a tile");
    const { pos, neg } = currentExamples();
    if (!pos.size) return showError("mark at least one result + (an uploaded image cannot be an example)");
    const s = keepSettings();
    s.pos = [...pos];
    s.neg = [...neg];
    s.classifier = $("classifier").checked;
    if (s.classifier && s.threshold !== null && !$("threshold-mode").dataset.classifier) s.threshold = 0.5;
    upload = null;
    marks = new Map();
    search(s);
  }

  // ---- showing results --------------------------------------------------------------------------

  function valueName(rec) {
    return ["distance", "score"].find((n) => n in rec) || "distance";
  }
  const isClassifier = (doc) => Boolean(doc && doc.query && doc.query.type === "classifier");
  const isChanges = (doc) => Boolean(doc && doc.query && doc.query.type === "changes");
  const isHistory = (doc) => Boolean(doc && doc.query && doc.query.type === "history");
  const day = (t) => (t ? t.slice(0, 10) : "no date");

  function show(doc, ms) {
    last = doc;
    seq += 1;
    document.body.dataset.seq = String(seq);
    const recs = doc.results;
    const vname = recs.length ? valueName(recs[0]) : "distance";
    // status line
    const passed = doc.total_passed !== undefined ? ` (${doc.total_passed} passed${doc.total_passed > recs.length ? ", best shown" : ""})` : "";
    const q0 = doc.query || {};
    const dated = q0.date ? `; ${q0.date.kept} image(s) in the date range, ${q0.date.outside + q0.date.undated} left out (${q0.date.undated} without a date)` : "";
    $("status").textContent = isChanges(doc)
      ? `${recs.length} most changed of ${q0.pairs} window pairs in ${Math.round(ms)} ms`
      : isHistory(doc)
        ? `${recs.length} image(s) over this place, oldest first (d: distance to the one before) in ${Math.round(ms)} ms${dated}`
        : `${recs.length} results${passed} in ${Math.round(ms)} ms${dated}`;
    $("export").disabled = !recs.length;
    // query
    const q = doc.query || {};
    const qbox = $("query");
    qbox.textContent = "";
    if (q.uid) {
      const img = document.createElement("img");
      img.src = `/api/tiles/${q.uid}.png?size=128`;
      img.alt = "query tile";
      qbox.appendChild(img);
    }
    const label = document.createElement("div");
    label.textContent = "query: " + (q.label || q.type || "");
    qbox.appendChild(label);
    if ((q.type === "uid" || q.type === "lonlat") && q.uid && !upload) { // the query tile's place through time
      const b = document.createElement("button");
      b.id = "history-run";
      b.textContent = "History of this place";
      b.title = "the window over the query tile's centre in every image that covers it, oldest first";
      b.addEventListener("click", () => search(Object.assign(blank(), { history: true, uid: q.uid, date: rangeOf("date-from", "date-to") })));
      qbox.appendChild(b);
    }
    // gallery
    const gal = $("gallery");
    gal.textContent = "";
    for (const r of recs) {
      const card = document.createElement("div");
      card.className = "result";
      card.dataset.uid = r.uid;
      const m = marks.get(r.uid);
      if (m) card.classList.add(m);
      const img = document.createElement("img");
      img.loading = "lazy";
      img.src = `/api/tiles/${r.uid}.png?size=128`;
      img.alt = `result ${r.rank}`;
      img.title = `uid ${r.uid}\n${r.image_path}\nrow ${r.row}, col ${r.col}` + (r.acquired ? `\nacquired ${r.acquired}` : "");
      img.addEventListener("click", () => highlight(r.uid, false));
      if (isChanges(doc)) { // the same ground before, beside the window now
        card.classList.add("change");
        const was = document.createElement("img");
        was.loading = "lazy";
        was.className = "before";
        was.src = `/api/tiles/${r.before_uid}.png?size=128`;
        was.alt = `before ${r.rank}`;
        was.title = `before: uid ${r.before_uid}\n${r.before_image_path}\nrow ${r.before_row}, col ${r.before_col}\nacquired ${r.before_acquired || "unknown"}`;
        const meta = document.createElement("div");
        meta.className = "meta";
        meta.innerHTML = "<span></span><span></span>";
        meta.children[0].textContent = "#" + r.rank;
        meta.children[1].textContent = "robust" in r ? `robust ${(+r.robust).toFixed(1)}` : `distance ${(+r.distance).toFixed(3)}`;
        const name = document.createElement("div");
        name.className = "name";
        name.textContent = `${day(r.before_acquired)} → ${day(r.acquired)}`;
        card.append(was, img, meta, name);
        gal.appendChild(card);
        continue;
      }
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.innerHTML = "<span></span><span></span>";
      meta.children[0].textContent = "#" + r.rank;
      meta.children[1].textContent = `${isClassifier(doc) ? "p" : isHistory(doc) ? "d" : vname} ${(+r[vname]).toFixed(3)}`;
      const name = document.createElement("div");
      name.className = "name";
      name.textContent = isHistory(doc) ? `${day(r.acquired)} · ${r.image_path.split("/").pop()}`
        : r.image_path.split("/").pop() + (r.acquired ? ` · ${day(r.acquired)}` : "");
      const marksRow = document.createElement("div");
      marksRow.className = "marks";
      for (const [kind, text] of [["positive", "+"], ["negative", "−"]]) {
        const b = document.createElement("button");
        b.className = kind === "positive" ? "pos" : "neg";
        b.textContent = text;
        b.title = `mark as ${kind} example`;
        b.addEventListener("click", () => mark(r.uid, kind, card));
        marksRow.appendChild(b);
      }
      card.append(img, meta, name, marksRow);
      gal.appendChild(card);
    }
    // map outlines
    resultLayer.clearLayers();
    outlineOf.clear();
    if (doc.footprints) {
      resultLayer.addData(doc.footprints);
      resultLayer.eachLayer((layer) => {
        if (layer.feature.properties.role === "result") outlineOf.set(layer.feature.properties.uid, layer);
      });
      placeMap(doc.footprints.features);
    }
    // threshold slider range from what came back
    const slider = $("threshold");
    if (recs.length && !$("threshold-mode").checked) {
      const vals = recs.map((r) => +r[vname]).filter(isFinite);
      const prob = isClassifier(doc);
      const hi = prob ? 1 : Math.max(...vals) * 1.5;
      slider.max = String(hi);
      slider.step = String(hi / 500);
      slider.value = String(prob ? Math.min(...vals) : Math.max(...vals));
      $("threshold-value").textContent = (+slider.value).toFixed(3);
    }
    $("threshold-mode").dataset.classifier = isClassifier(doc) ? "1" : "";
    $("permalink").href = upload ? "#" : "#" + encode(state);
    $("permalink").title = upload ? "uploads are not part of permalinks" : "this search's address";
  }

  // A query clicked on the map keeps the view (the user is looking there); other queries show
  // their results: all of them when they lie close together, else the best one.
  function placeMap(features) {
    if (!features.length || features.some((f) => f.properties.role === "query")) return;
    const all = L.geoJSON({ type: "FeatureCollection", features }).getBounds();
    const span = map.distance(all.getSouthWest(), all.getNorthEast());
    const best = features.find((f) => f.properties.role === "result");
    const target = span < 20000 || !best ? all : L.geoJSON(best).getBounds();
    map.fitBounds(target.pad(0.3), { maxZoom: 20, animate: false });
  }

  function mark(uid, kind, card) {
    if (marks.get(uid) === kind) { marks.delete(uid); card.classList.remove(kind); return; }
    marks.set(uid, kind);
    card.classList.remove("positive", "negative");
    card.classList.add(kind);
  }

  function highlight(uid, fromMap) {
    for (const el of document.querySelectorAll(".result.active")) el.classList.remove("active");
    const card = document.querySelector(`.result[data-uid="${uid}"]`);
    if (card) { card.classList.add("active"); if (fromMap) card.scrollIntoView({ block: "nearest" }); }
    const rec = last && last.results.find((r) => r.uid === uid);
    const layer = outlineOf.get(uid);
    if (layer && !fromMap) map.flyToBounds(layer.getBounds().pad(1.5), { maxZoom: 21, duration: 0.8 });
    else if (!layer && rec) openImage(imageIdOf(rec.image_path), rec);
  }

  // ---- images: footprints, and the gallery view of images without a CRS ------------------------

  let images = [];
  const imageIdOf = (path) => { const f = images.find((i) => i.properties.path === path); return f ? f.properties.id : null; };

  async function loadImages() {
    const fc = await api("GET", "/api/images");
    images = fc.features;
    const placed = images.filter((f) => f.geometry);
    footprintLayer.addData({ type: "FeatureCollection", features: placed });
    // zoomed out, an image is a dot: a marker at its centre says where (and zooms in on a click)
    for (const f of placed) {
      const b = L.geoJSON(f).getBounds();
      L.circleMarker(b.getCenter(), { radius: 6, color: "#9fd3ff", weight: 2, fillOpacity: 0.4, className: "image-marker" })
        .bindTooltip(f.properties.name)
        .on("click", (ev) => { L.DomEvent.stopPropagation(ev); map.fitBounds(b.pad(0.1), { animate: false }); })
        .addTo(markerLayer);
    }
    const list = $("image-list");
    list.textContent = "";
    for (const f of images) {
      const p = f.properties;
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.textContent = p.name;
      a.addEventListener("click", () => openImage(p.id));
      li.append(a, ` — ${p.tiles} tiles, ${p.acquired ? day(p.acquired) + ", " : ""}${p.crs ? p.crs : "no CRS (gallery only)"}${p.status !== "done" ? ", " + p.status : ""}`);
      list.appendChild(li);
    }
    return fc;
  }

  let preview = { id: null, factor: 1 };
  async function openImage(id, rec) {
    if (id === null || id === undefined) return;
    $("images-panel").hidden = false;
    $("preview-wrap").hidden = false;
    const p = images[id].properties;
    $("preview-title").textContent = `${p.name} (${p.width} × ${p.height} px): click a place to search from its tile`;
    if (preview.id !== id) {
      setBusy(true);
      try {
        const resp = await fetch(`/api/images/${id}/preview.png?max=1024`);
        if (!resp.ok) throw new Error((await resp.json()).error);
        preview = { id, factor: +resp.headers.get("X-Preview-Factor") || 1 };
        $("preview").src = URL.createObjectURL(await resp.blob());
        await $("preview").decode();
      } catch (e) { showError(e.message); } finally { setBusy(false); }
    }
    const box = $("preview-window");
    if (rec) {
      const f = preview.factor;
      const scale = $("preview").clientWidth / $("preview").naturalWidth;
      Object.assign(box.style, { display: "block", left: `${(rec.col / f) * scale}px`, top: `${(rec.row / f) * scale}px`,
        width: `${(256 / f) * scale}px`, height: `${(256 / f) * scale}px` });
    } else box.style.display = "none";
  }

  $("preview").addEventListener("click", async (ev) => {
    const img = $("preview");
    const scale = img.naturalWidth / img.clientWidth;
    const x = ev.offsetX * scale * preview.factor;
    const y = ev.offsetY * scale * preview.factor;
    try {
      const t = await api("GET", `/api/images/${preview.id}/uid?x=${x.toFixed(1)}&y=${y.toFixed(1)}`);
      upload = null;
      search(Object.assign(keepSettings(), { uid: t.uid }));
    } catch (e) { showError(e.message); }
  });

  // ---- controls -------------------------------------------------------------------------------

  $("rerun").addEventListener("click", rerunWithMarks);
  $("changes-run").addEventListener("click", showChanges);
  for (const id of ["date-from", "date-to"]) { // a new date range: its flights, and the current query again
    $(id).addEventListener("change", () => {
      const date = rangeOf("date-from", "date-to");
      if (!state.changes) showFlights({ date, changes: null });
      if (!hasQuery(state) || state.changes || upload) return;
      search(Object.assign({}, state, { date }));
    });
  }
  // Examples as a file: what `aerial-search classify/search --examples FILE` reads (CSV uid,label),
  // and such a file (or lon,lat,label rows, or GeoJSON points with a label) back into the page.
  $("save-examples").addEventListener("click", () => {
    const { pos, neg } = currentExamples();
    if (!pos.size && !neg.size) return showError("no examples yet: search, then mark results + or −");
    const where = new Map(((last && last.results) || []).map((r) => [r.uid, r]));
    const line = (uid, label) => { const r = where.get(uid); return [uid, label, r ? r.lon : "", r ? r.lat : ""].join(","); };
    const rows = ["uid,label,lon,lat", ...[...pos].map((u) => line(u, "positive")), ...[...neg].map((u) => line(u, "negative"))];
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([rows.join("\n") + "\n"], { type: "text/csv" }));
    a.download = "examples.csv";
    a.click();
    $("status").textContent = `${pos.size} positive and ${neg.size} negative example(s) saved as examples.csv ` +
      "(aerial-search classify --store STORE --examples examples.csv)";
  });

  function parseExamples(name, text) {
    const out = [];
    const label = (v, where) => {
      const l = String(v || "").trim().toLowerCase();
      if (l !== "positive" && l !== "negative") throw new Error(`${name} ${where}: label '${v}' is not positive or negative`);
      return l;
    };
    if (/\.(geo)?json$/i.test(name) || text.trim().startsWith("{")) {
      let doc;
      try { doc = JSON.parse(text); } catch (e) { throw new Error(`${name}: not JSON (${e.message})`); }
      (doc.features || []).forEach((f, n) => {
        const g = f.geometry || {};
        if (g.type !== "Point") throw new Error(`${name} feature ${n}: a Point is needed, not ${g.type}`);
        const props = f.properties || {};
        out.push({ uid: /^\d+$/.test(String(props.uid || "")) ? String(props.uid) : null,
                   lonlat: g.coordinates.slice(0, 2).map(Number), label: label(props.label, `feature ${n}`) });
      });
    } else {
      const lines = text.split(/\r?\n/).filter((l) => l.trim());
      const head = (lines.shift() || "").split(",").map((c) => c.trim().replace(/^"|"$/g, "").toLowerCase());
      const col = (row, c) => (head.indexOf(c) >= 0 ? (row[head.indexOf(c)] || "").trim().replace(/^"|"$/g, "") : "");
      if (!head.includes("label") || !(head.includes("uid") || (head.includes("lon") && head.includes("lat")))) {
        throw new Error(`${name} needs a 'label' column and 'uid', or 'lon' and 'lat', columns`);
      }
      lines.forEach((l, n) => {
        const row = l.split(",");
        const uid = col(row, "uid");
        const lonlat = [+col(row, "lon"), +col(row, "lat")];
        if (!/^\d+$/.test(uid) && !(col(row, "lon") && lonlat.every(isFinite))) throw new Error(`${name} line ${n + 2}: no uid or lon/lat`);
        out.push({ uid: /^\d+$/.test(uid) ? uid : null, lonlat, label: label(col(row, "label"), `line ${n + 2}`) });
      });
    }
    if (!out.length) throw new Error(`${name} holds no examples`);
    return out;
  }

  async function loadExamples(file) {
    showError("");
    setBusy(true, "reading examples…");
    try {
      const rows = parseExamples(file.name, await file.text());
      const places = rows.filter((r) => !r.uid);
      for (let i = 0; i < places.length; i += 100) { // each place's tile, as a click there finds it
        const q = new URLSearchParams({ k: "1" });
        for (const r of places.slice(i, i + 100)) q.append("lonlat", r.lonlat.join(","));
        const docs = await api("GET", "/api/search?" + q.toString());
        (Array.isArray(docs) ? docs : [docs]).forEach((d, j) => { places[i + j].uid = String(d.query.uid); });
      }
      const s = keepSettings();
      s.pos = [...new Set(rows.filter((r) => r.label === "positive").map((r) => r.uid))];
      s.neg = [...new Set(rows.filter((r) => r.label === "negative").map((r) => r.uid))].filter((u) => !s.pos.includes(u));
      if (!s.pos.length) throw new Error(`${file.name}: no positive example`);
      s.classifier = $("classifier").checked;
      upload = null;
      marks = new Map();
      await search(s);
    } catch (e) { showError(e.message); $("status").textContent = ""; } finally { setBusy(false); }
  }
  $("load-examples").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) loadExamples(f); ev.target.value = ""; });

  $("clear-marks").addEventListener("click", () => {
    marks = new Map();
    for (const el of document.querySelectorAll(".result")) el.classList.remove("positive", "negative");
  });
  $("upload").addEventListener("change", (ev) => { const f = ev.target.files[0]; if (f) searchUpload(f); ev.target.value = ""; });
  $("threshold-mode").addEventListener("change", () => {
    $("threshold").disabled = !$("threshold-mode").checked;
    $("k").disabled = $("threshold-mode").checked;
  });
  $("threshold").addEventListener("input", () => { $("threshold-value").textContent = (+$("threshold").value).toFixed(3); });
  $("threshold").addEventListener("change", () => {
    if (!hasQuery(state) && !upload) return;
    if (upload) return searchUpload(upload.file);
    search(Object.assign({}, state, { threshold: +$("threshold").value }));
  });
  $("open-images").addEventListener("click", (ev) => { ev.preventDefault(); $("images-panel").hidden = false; });
  $("close-images").addEventListener("click", () => { $("images-panel").hidden = true; });
  $("export").addEventListener("click", async () => {
    setBusy(true, "exporting…");
    try {
      let blob;
      if (upload || isChanges(last)) { // the hits on the page (an upload cannot be searched again by address)
        const feats = (last.footprints ? last.footprints.features : []).filter((f) => f.properties.role === "result");
        blob = new Blob([JSON.stringify({ type: "FeatureCollection", features: feats })], { type: "application/geo+json" });
      } else {
        const [method, path, body] = request(state);
        const url = path.replace("/api/search", "/api/export.geojson");
        blob = await api(method, url, body, true);
      }
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = "hits.geojson";
      a.click();
      $("status").textContent = "hits exported as hits.geojson";
    } catch (e) { showError(e.message); } finally { setBusy(false); }
  });

  function applyToControls(s) {
    $("k").value = s.k;
    $("diverse").checked = s.diverse;
    $("classifier").checked = s.classifier;
    $("in-view").checked = Boolean(s.bbox);
    $("threshold-mode").checked = s.threshold !== null;
    setRange("date-from", "date-to", s.date);
    if (s.changes) {
      $("changes-box").open = true;
      setRange("before-from", "before-to", s.changes.before);
      setRange("after-from", "after-to", s.changes.after);
      $("changes-robust").checked = Boolean(s.changes.robust);
    }
    $("threshold").disabled = s.threshold === null;
    $("k").disabled = s.threshold !== null;
    if (s.threshold !== null) {
      $("threshold").max = String(Math.max(+$("threshold").max, s.threshold * 1.5));
      $("threshold").value = String(s.threshold);
      $("threshold-value").textContent = s.threshold.toFixed(3);
    }
  }

  window.addEventListener("popstate", () => {
    const s = decode(location.hash);
    if (hasQuery(s)) { applyToControls(s); search(s, false); }
  });

  // ---- start ------------------------------------------------------------------------------------

  async function start() {
    setBusy(true, "loading the store…");
    try {
      const info = await api("GET", "/api/info");
      $("store-info").textContent = `${info.store.split("/").pop()}: ${info.tiles.toLocaleString()} tiles in ` +
        `${info.images} images, ${info.model.arch || "?"} fingerprints`;
      const fc = await loadImages();
      const onMap = L.geoJSON({ type: "FeatureCollection", features: fc.features.filter((f) => f.geometry) });
      if (onMap.getLayers().length) map.fitBounds(onMap.getBounds().pad(0.05));
      else $("images-panel").hidden = false; // nothing has a place on the map: the gallery view
    } catch (e) {
      showError(e.message);
    } finally {
      setBusy(false, "");
    }
    const s = decode(location.hash);
    if (hasQuery(s)) { applyToControls(s); await search(s, false); }
    document.body.dataset.ready = "1";
  }

  window.aerialSearch = { map, basemap, get beforeMap() { return beforeMap; }, get state() { return state; }, get last() { return last; }, encode, decode };
  start();
})();
