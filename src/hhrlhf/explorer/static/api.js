// The API page's "Try it" forms: send only the fields that are filled in (an empty field
// would be a value the API has to refuse, e.g. turns_min=).
(function () {
  "use strict";
  document.querySelectorAll("form.try-form").forEach(function (form) {
    form.addEventListener("submit", function () {
      form.querySelectorAll("input, select").forEach(function (field) {
        field.disabled = field.value.trim() === "";
      });
      // Enabled again for when the reader comes back to this page.
      setTimeout(function () {
        form.querySelectorAll("input, select").forEach(function (f) { f.disabled = false; });
      }, 0);
    });
  });
})();
