// pacs-bridge console: heatmap overlay controls and the upload page. No framework, no build step.
"use strict";

(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const SVG = "http://www.w3.org/2000/svg";

  function applyOverlay() {
    const show = document.getElementById("show-heatmap");
    const boxes = document.getElementById("show-boxes");
    const opacity = document.getElementById("opacity");
    if (!show) return;
    document.body.classList.toggle("hide-heatmap", !show.checked);
    document.body.classList.toggle("hide-boxes", boxes && !boxes.checked);
    const value = String(Number(opacity.value) / 100);
    document.querySelectorAll("image.heatmap").forEach((el) => el.setAttribute("opacity", value));
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, String(v)));
    return node;
  }

  function viewer(r) {
    const svg = svgEl("svg", { class: "radiograph", viewBox: `0 0 ${r.width} ${r.height}`, role: "img",
      "aria-label": "uploaded radiograph", preserveAspectRatio: "xMidYMid meet" });
    const base = `/api/uploads/${encodeURIComponent(r.id)}`;
    svg.appendChild(svgEl("image", { href: `${base}/image.png`, x: 0, y: 0, width: r.width, height: r.height,
      preserveAspectRatio: "none" }));
    if (r.has_heatmap) {
      svg.appendChild(svgEl("image", { class: "heatmap", href: `${base}/heatmap.png`, x: 0, y: 0, width: r.width,
        height: r.height, preserveAspectRatio: "none", opacity: 0.5 }));
    }
    (r.boxes || []).forEach((b) => {
      if (!b || !b.box) return;
      const [x0, y0, x1, y1] = b.box;
      const g = svgEl("g", { class: "box" });
      g.appendChild(svgEl("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0,
        "vector-effect": "non-scaling-stroke" }));
      if (typeof b.score === "number") {
        const t = svgEl("text", { x: x0, y: y0, dy: "-0.4em", "font-size": Math.round(Math.max(r.width, r.height) / 28) });
        t.textContent = b.score.toFixed(2);
        g.appendChild(t);
      }
      svg.appendChild(g);
    });
    return svg;
  }

  function resultCard(r, canStore) {
    const card = el("article", { class: "instance upload-result" + (r.fracture ? " positive" : "") });
    if (r.error) {
      card.appendChild(el("div", { class: "facts" })).append(
        el("strong", {}, r.name), el("div", { class: "error upload-error" }, r.error));
      return card;
    }
    card.appendChild(viewer(r));
    const facts = el("div", { class: "facts" });
    facts.appendChild(el("div", {}, r.name));
    const verdict = el("div");
    verdict.appendChild(el("span", { class: "badge " + (r.fracture ? "positive" : "negative") },
      r.fracture ? "fracture" : "no fracture"));
    verdict.append(" p = ");
    verdict.appendChild(el("strong", { class: "prob" }, r.probability.toFixed(3)));
    verdict.appendChild(el("span", { class: "muted" }, ` (threshold ${r.threshold.toFixed(3)})`));
    facts.appendChild(verdict);
    facts.appendChild(el("div", { class: "muted body-region" },
      `body region: ${r.body_part || "not determined"} · ${r.model.name} ${r.model.version}`));
    const actions = el("div", { class: "result-actions" });
    actions.appendChild(el("a", { class: "report", href: `/api/uploads/${encodeURIComponent(r.id)}/report.pdf`,
      download: "ai-fracture-report.pdf" }, "Download report (PDF)"));
    if (r.can_store && canStore) {
      const form = el("form", { method: "post", action: `/uploads/${encodeURIComponent(r.id)}/store` });
      form.appendChild(el("input", { type: "hidden", name: "csrf", value: csrf() }));
      form.appendChild(el("button", { type: "submit", class: "store" }, "Store as a study"));
      actions.appendChild(form);
    }
    facts.appendChild(actions);
    card.appendChild(facts);
    return card;
  }

  async function upload(files) {
    const status = document.getElementById("upload-status");
    const out = document.getElementById("upload-results");
    if (!files.length) { status.textContent = "Choose a file first."; return; }
    const body = new FormData();
    Array.from(files).forEach((f) => body.append("files", f, f.name));
    status.textContent = `Analysing ${files.length} file(s)…`;
    let response;
    try {
      response = await fetch("/api/uploads", { method: "POST", body, headers: { "X-CSRF-Token": csrf() },
        credentials: "same-origin" });
    } catch (err) {
      status.textContent = "The server could not be reached.";
      return;
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      status.textContent = `Not analysed: ${data.detail || response.statusText}`;
      status.classList.add("error");
      return;
    }
    status.classList.remove("error");
    const results = data.results || [];
    const failed = results.filter((r) => r.error).length;
    status.textContent = `${results.length - failed} analysed` + (failed ? `, ${failed} could not be analysed` : "") + ".";
    const canStore = out.dataset.canStore === "yes";
    results.forEach((r) => out.prepend(resultCard(r, canStore)));
    applyOverlay();
  }

  document.addEventListener("DOMContentLoaded", () => {
    ["show-heatmap", "show-boxes", "opacity"].forEach((id) => {
      const node = document.getElementById(id);
      if (node) node.addEventListener("input", applyOverlay);
    });
    applyOverlay();
    const form = document.getElementById("upload-form");
    if (!form) return;
    const input = document.getElementById("files");
    form.addEventListener("submit", (event) => { event.preventDefault(); upload(input.files); });
    form.addEventListener("dragover", (event) => { event.preventDefault(); form.classList.add("over"); });
    form.addEventListener("dragleave", () => form.classList.remove("over"));
    form.addEventListener("drop", (event) => {
      event.preventDefault();
      form.classList.remove("over");
      upload(event.dataTransfer.files);
    });
  });
})();
