// Start Authentication opens the sign-in as a pop-up; the form then targets it (without
// JavaScript the form still works, in a new tab).
document.getElementById("office365").addEventListener("submit", function () {
  window.open("about:blank", "office365", "popup,width=520,height=680");
});
