// zoom and overlay opacity: range inputs with data-target pointing at a .viewer
document.querySelectorAll('input[data-zoom]').forEach(function (r) {
  r.addEventListener('input', function () {
    document.querySelectorAll(r.dataset.zoom + ' img').forEach(function (img) {
      img.style.width = r.value + '%';
    });
  });
  r.dispatchEvent(new Event('input'));
});
document.querySelectorAll('input[data-opacity]').forEach(function (r) {
  r.addEventListener('input', function () {
    document.querySelectorAll(r.dataset.opacity + ' img.overlay').forEach(function (img) {
      img.style.opacity = r.value / 100;
    });
  });
  r.dispatchEvent(new Event('input'));
});
