// The grading viewer: OpenSeadragon over the Deep Zoom tiles that views/tile_server.py serves.
// Every view of a photograph is a layer of one OpenSeadragon world, laid in the photograph's
// own pixels: switching view changes which layers show, so zoom and position stay. Once the
// shown layers have every tile they need, the hidden ones load theirs too (preload), so that a
// switch shows them at once; until then the shown ones have the connections to themselves.
// The viewer lives as long as the page: a new photograph is opened in the same viewer.

const KEYS_IGNORED_IN = 'input, textarea, select, [contenteditable="true"]';
const PAN_STEP = 0.1; // of the visible width, per arrow key
const ZOOM_STEP = 1.5;
const MAX_PIXEL_RATIO = 8; // screen pixels per photograph pixel at the deepest zoom
const DECISION_KEYS = new Set(["a", "x", "0", "1", "2", "3", " "]); // views/review.py's
const AWAIT_CARD_MS = 5000; // a card that does not come by then is not held back for

let library;

function loadLibrary(url) {
  if (window.OpenSeadragon) return Promise.resolve(window.OpenSeadragon);
  library ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = url;
    script.onload = () => resolve(window.OpenSeadragon);
    script.onerror = () => reject(new Error(`cannot load ${url}`));
    document.head.appendChild(script);
  });
  return library;
}

function tileSource(data, view) {
  return {
    Image: {
      xmlns: "http://schemas.microsoft.com/deepzoom/2008",
      Url: `${data.base}/${view}_files/`,
      Format: "jpeg",
      Overlap: String(data.overlap),
      TileSize: String(data.tileSize),
      Size: { Width: String(data.width), Height: String(data.height) },
    },
  };
}

// [name, OpenSeadragon item options] of the photograph's pyramids, and of the images laid over
// them (the model's input, Grad-CAM), placed in the photograph's own pixels.
function pyramidLayers(data) {
  return data.pyramids.map((view) => [view, { tileSource: tileSource(data, view) }]);
}

function overLayers(data) {
  return data.layers.map((layer) => [layer.name, {
    tileSource: { type: "image", url: layer.url, buildPyramid: false },
    x: layer.box[0] / data.width, y: layer.box[1] / data.width, width: layer.box[2] / data.width,
  }]);
}

class Viewer {
  constructor(OpenSeadragon, root, data) {
    this.root = root;
    this.canvas = root.querySelector(".osd");
    this.osd = OpenSeadragon({
      element: this.canvas, prefixUrl: `${data.lib}/images/`, showNavigationControl: false,
      // The canvas drawer reports each tile it draws (the WebGL one does not), and needs no GPU.
      drawer: "canvas", keyboardNavEnabled: false, maxZoomPixelRatio: MAX_PIXEL_RATIO, visibilityRatio: 0.2,
      animationTime: 0.2, springStiffness: 12, imageLoaderLimit: 8, immediateRender: true,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
      gestureSettingsTouch: { pinchToZoom: true, dblClickToZoom: true },
    });
    this.maxLevel = 0;
    this.osd.addHandler("tile-drawn", (event) => {
      // The deepest pyramid level drawn: the browser test reads it to see native pixels.
      if (event.tiledImage === this.items[this.pyramids[0]] && event.tile.level > this.maxLevel) {
        this.maxLevel = event.tile.level;
        this.root.dataset.maxLevelDrawn = String(this.maxLevel);
      }
    });
    // data-loaded: every tile the current view needs is drawn (the benchmark waits for it).
    this.osd.addHandler("update-viewport", () => { this.report(); this.checkLoaded(); });
    root.querySelector(".toolbar").addEventListener("click", (event) => this.onButton(event));
    this.open(data);
  }

  // A new photograph: its pyramids at once, the current view shown as each arrives; the layers
  // laid over it once that view is drawn, unless the view is one of them.
  open(data) {
    this.data = data;
    this.items = {};
    this.pyramids = data.pyramids;
    this.maxLevel = 0;
    this.view = this.view && this.viewNames().includes(this.view) ? this.view : data.views[0].name;
    Object.assign(this.root.dataset, {
      photo: data.token, view: this.view, maxLevelDrawn: "0", loaded: "0",
      levels: String(Math.ceil(Math.log2(Math.max(data.width, data.height)))),
    });
    this.osd.world.removeAll();
    this.add(pyramidLayers(data));
    this.overlaid = false;
    if (!this.pyramids.includes(this.view)) this.overlay();
    this.drawToolbar();
  }

  add(layers) {
    const token = this.data.token;
    for (const [name, options] of layers) {
      this.osd.addTiledImage({
        ...options, opacity: this.shownLayers().has(name) ? 1 : 0,
        success: (event) => {
          if (this.data.token !== token) return;  // a photograph opened since
          this.items[name] = event.item;
          this.checkLoaded();
        },
      });
    }
  }

  overlay() {
    if (this.overlaid) return;
    this.overlaid = true;
    this.add(overLayers(this.data));
  }

  shownLayers() { return new Set(this.data.views.find((v) => v.name === this.view).layers); }

  update(data) {
    if (data.token !== this.data.token) { this.open(data); return; }
    if (JSON.stringify(data.layers) === JSON.stringify(this.data.layers)) return;
    // New layers over the same photograph (Grad-CAM on or off): the zoom stays.
    for (const [name] of overLayers(this.data)) {
      if (this.items[name]) this.osd.world.removeItem(this.items[name]);
      delete this.items[name];
    }
    this.data = data;
    this.view = this.viewNames().includes(this.view) ? this.view : data.views[0].name;
    this.overlaid = false;
    this.overlay();
    this.drawToolbar();
    this.showView(this.view);
  }

  viewNames() { return this.data.views.map((v) => v.name); }

  visibleItems() {
    return [...this.shownLayers()].map((layer) => this.items[layer]);
  }

  checkLoaded() {
    const items = this.visibleItems();
    const loaded = items.every((item) => item && item.getFullyLoaded());
    this.root.dataset.loaded = loaded && !this.osd.isAnimating() ? "1" : "0";
    if (loaded) { this.overlay(); this.preload(true); this.preloadNext(); }
  }

  preload(hidden) {
    const shown = new Set(this.visibleItems().filter(Boolean));
    for (const item of Object.values(this.items)) item.setPreload(hidden && !shown.has(item));
  }

  // A decision key: the next card's photograph, fetched ahead, in the view on screen; its
  // layers come with the card. Without it fetched ahead, the card brings it. Either way the
  // decision keys wait for that card.
  decided() {
    const next = this.data.next;
    this.awaiting = this.data.token;
    setTimeout(() => { this.awaiting = null; }, AWAIT_CARD_MS);
    if (next && this.fetchedNext === next.base && this.pyramids.includes(this.view)) {
      this.open({ ...this.data, ...next, layers: [], next: null });
    }
  }

  // The next card's photograph, as this view shows it fitted: its tiles into the browser's
  // cache, so that a decision's next card draws from there.
  preloadNext() {
    const next = this.data.next;
    if (!next || this.preloaded === next.base) return;
    this.preloaded = next.base;
    fetch(`${next.base}/ready`).then((reply) => reply.ok && this.fetchNext(next));
  }

  fetchNext(next) {
    this.fetchedNext = next.base;
    const view = this.pyramids.includes(this.view) ? this.view : this.pyramids[0];
    const maxLevel = Math.ceil(Math.log2(Math.max(next.width, next.height)));
    const screen = this.canvas.getBoundingClientRect();
    const scale = Math.min(screen.width / next.width, screen.height / next.height)
      * window.devicePixelRatio;
    const top = Math.min(maxLevel, Math.ceil(maxLevel + Math.log2(scale)));
    this.preloads = [];
    for (let level = 0; level <= top; level++) {
      const factor = 2 ** (maxLevel - level);
      const cols = Math.ceil(Math.ceil(next.width / factor) / this.data.tileSize);
      const rows = Math.ceil(Math.ceil(next.height / factor) / this.data.tileSize);
      for (let col = 0; col < cols; col++) {
        for (let row = 0; row < rows; row++) {
          const image = new Image();
          image.src = `${next.base}/${view}_files/${level}/${col}_${row}.jpeg`;
          this.preloads.push(image);
        }
      }
    }
  }

  changing() { this.root.dataset.loaded = "0"; this.preload(false); this.osd.forceRedraw(); }

  showView(name) {
    this.view = name;
    const shown = this.shownLayers();
    if (![...shown].every((layer) => this.pyramids.includes(layer))) this.overlay();
    this.changing();
    for (const [layer, item] of Object.entries(this.items)) item.setOpacity(shown.has(layer) ? 1 : 0);
    this.markView();
  }

  cycleView(step) {
    const names = this.viewNames();
    this.showView(names[(names.indexOf(this.view) + step + names.length) % names.length]);
  }

  imageZoom() {
    const item = this.items[this.pyramids[0]];
    return item ? item.viewportToImageZoom(this.osd.viewport.getZoom(true)) : 0;
  }

  native() {
    const item = this.items[this.pyramids[0]];
    if (item) { this.changing(); this.osd.viewport.zoomTo(item.imageToViewportZoom(1), null, true); }
  }

  zoomBy(factor) { this.changing(); this.osd.viewport.zoomBy(factor); this.osd.viewport.applyConstraints(); }

  fit() { this.changing(); this.osd.viewport.goHome(true); }

  pan(dx, dy) {
    this.changing();
    const bounds = this.osd.viewport.getBounds();
    this.osd.viewport.panBy(new window.OpenSeadragon.Point(dx * bounds.width * PAN_STEP,
                                                           dy * bounds.height * PAN_STEP));
    this.osd.viewport.applyConstraints();
  }

  report() {
    const zoom = this.imageZoom();
    this.root.dataset.imageZoom = zoom.toFixed(3);
    const label = this.root.querySelector(".zoom");
    if (label) label.textContent = `${Math.round(zoom * 100)} %`;
  }

  onButton(event) {
    const button = event.target.closest("button");
    if (!button) return;
    const act = button.dataset.act;
    if (button.dataset.view) this.showView(button.dataset.view);
    else if (act === "fit") this.fit();
    else if (act === "native") this.native();
    else if (act === "in") this.zoomBy(ZOOM_STEP);
    else if (act === "out") this.zoomBy(1 / ZOOM_STEP);
    button.blur(); // the grading keys go on working after a click
  }

  drawToolbar() {
    const bar = this.root.querySelector(".toolbar");
    const views = this.data.views.map((v) =>
      `<button data-view="${v.name}" title="${v.help}">${v.label}</button>`).join("");
    bar.innerHTML = `${views}<span class="gap"></span>`
      + '<button data-act="out" title="Zoom out (-)">−</button>'
      + '<span class="zoom"></span>'
      + '<button data-act="in" title="Zoom in (+)">+</button>'
      + '<button data-act="native" title="Native pixels: one photograph pixel per screen pixel (n)">1:1</button>'
      + '<button data-act="fit" title="Fit the photograph (f)">Fit</button>';
    this.markView();
  }

  markView() {
    this.root.dataset.view = this.view;
    this.root.querySelectorAll("button[data-view]").forEach((button) => {
      button.classList.toggle("active", button.dataset.view === this.view);
    });
  }

  onKey(event) {
    const key = event.key;
    const actions = {
      ArrowLeft: () => this.pan(-1, 0), ArrowRight: () => this.pan(1, 0),
      ArrowUp: () => this.pan(0, -1), ArrowDown: () => this.pan(0, 1),
      "+": () => this.zoomBy(ZOOM_STEP), "=": () => this.zoomBy(ZOOM_STEP),
      "-": () => this.zoomBy(1 / ZOOM_STEP), n: () => this.native(), f: () => this.fit(),
      v: () => this.cycleView(1), V: () => this.cycleView(-1),
    };
    if (!actions[key]) return;
    event.preventDefault();
    actions[key]();
  }

  destroy() { this.osd.destroy(); }
}

function typing(event) {
  return event.ctrlKey || event.altKey || event.metaKey
    || (event.target.closest && event.target.closest(KEYS_IGNORED_IN));
}

// Listeners for the whole page, made once, for the viewer on screen; none acts on a key typed
// into a field or pressed with Ctrl, Alt or Cmd. The first runs before Streamlit's shortcuts:
// a decision key shows the next photograph at once (it is in the browser's cache) while its
// button's rerun brings the rest of the card, and until that card is here the decision keys
// are held back, since their buttons still belong to the card before.
function listen() {
  if (window.__gradingViewerKeys) return;
  window.__gradingViewerKeys = (event) => {
    const viewer = window.__gradingViewer;
    if (viewer && viewer.root.isConnected && !typing(event)) viewer.onKey(event);
  };
  window.__gradingViewerDecisions = (event) => {
    const viewer = window.__gradingViewer;
    if (!viewer || !viewer.root.isConnected || typing(event) || !DECISION_KEYS.has(event.key)) return;
    if (!viewer.data.decides) return;
    if (viewer.awaiting) {
      event.stopImmediatePropagation();
      event.preventDefault();
    } else {
      viewer.decided();
    }
  };
  document.addEventListener("keydown", window.__gradingViewerKeys);
  window.addEventListener("keydown", window.__gradingViewerDecisions, true);
}

export default function ({ parentElement, data }) {
  const root = parentElement.querySelector(".grading-viewer");
  root.style.height = `${data.height_px}px`;
  listen();
  loadLibrary(`${data.lib}/openseadragon.min.js`).then((OpenSeadragon) => {
    const viewer = root.__viewer;
    if (!viewer) root.__viewer = new Viewer(OpenSeadragon, root, data);
    else if (viewer.awaiting !== data.token) viewer.update(data);  // not the card before again
    if (root.__viewer.awaiting && root.__viewer.awaiting !== data.token) root.__viewer.awaiting = null;
    window.__gradingViewer = root.__viewer;
  }).catch((error) => { root.querySelector(".osd").textContent = String(error); });
}
