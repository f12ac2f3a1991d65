// Leaves the login page for the Email Sync page; the link on the page does the same by hand.
document.location.replace(document.getElementById("continue").href);
