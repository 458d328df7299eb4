//! `libfido_sim_middleware.so`: fido-sim as an OpenSSH security-key
//! middleware, for `ssh-keygen -w`, `ssh-add -S` and token-agent's tests.
//!
//! It exports `sk_api_version`, `sk_enroll`, `sk_sign` and
//! `sk_load_resident_keys` over the simulator in the state file
//! `TOKEN_AGENT_FIDO_SIM` names; see `fido_sim::middleware` for the
//! environment it reads. Build it with
//! `cargo build -p fido-sim --example fido_sim_middleware`.

// The C shims with their unsafe code come from the sk-api crate's macro;
// this file writes none.
#![forbid(unsafe_code)]

token_agent_sk_api::export_provider!(fido_sim::middleware::Middleware);
