//! token-agent-pkcs11-helper: the process in which the agent loads each
//! PKCS#11 module (see token_agent_pkcs11::helper). A binary of its own, so
//! that a helper maps only the helper's code and the module's libraries, not
//! the agent's. The agent starts it with the module's requests on stdin and
//! reads the answers on stdout; it is not meant to be run by hand.

#![forbid(unsafe_code)]

fn main() {
    token_agent_pkcs11::helper::run()
}
