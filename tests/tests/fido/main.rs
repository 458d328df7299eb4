//! The FIDO backend (issue 7): sk keys against fido-sim and OpenSSH's tools.

// The backend against fido-sim directly: signatures, PINs, touches, devices.
mod backend;
// The real agent with a simulated key attached: ssh-add, logins, ssh-keygen -Y.
mod e2e;
// A physical security key over USB HID, only with TOKEN_AGENT_FIDO_HARDWARE=1.
mod hardware;
// OpenSSH's sk middleware API: ssh-keygen -w, ssh-add -S with fido-sim's middleware; -P; isolation.
mod middleware;
// Starting the fido-sim build of the agent and logging in through it.
mod support;
// -O no-restrict-websafe and websafe-allow: web-origin sk keys sign only SSH data, next to OpenSSH 10.5.
mod websafe;
