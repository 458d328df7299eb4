//! The PIV backend (issue 6) against piv-sim through a private pcscd and vpcd:
//! no mocks. Each test starts its own rig; tests that use PC/SC in this
//! process re-run themselves in a child process (see `PcscRig::run_child_test`).

/// The real binary: `token-agent piv setup`, `list` and `unblock`, then SSH logins.
mod agent;
/// The backend in-process: listing, signing under each policy, PINs, touch,
/// removal, other PC/SC clients (one holding the card exclusively), keys the
/// agent cannot use, and PINs kept out of the logs.
mod backend;
/// Helpers shared by the themes: provisioning cards, running a child test.
mod common;
/// OpenSC's PKCS#11 module through the PKCS#11 backend sees the same card's key.
mod opensc;
