// After the Office 365 sign-in: refresh the Email Sync page that opened this pop-up, close it.
if (window.opener && !window.opener.closed) {
  window.opener.location.reload();
}
window.close();
