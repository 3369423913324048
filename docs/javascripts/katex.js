// Render the maths of every page with KaTeX (bundled under assets/katex/, no CDN). pymdownx.arithmatex
// (generic mode) wraps $...$ and $$...$$ in .arithmatex spans and divs; Material's instant navigation
// swaps pages without a reload, hence document$.
function renderMaths() {
  if (typeof renderMathInElement === "undefined") return;  // KaTeX not installed: TeX source stays
  document.querySelectorAll(".arithmatex").forEach((element) => {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMaths);
} else {
  document.addEventListener("DOMContentLoaded", renderMaths);
}
