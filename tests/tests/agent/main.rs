//! End-to-end tests of the agent front end: the real token-agent binary
//! against the real OpenSSH tools (ssh-add, ssh-keygen, ssh, sshd).

// Flags, background start, -k, command mode, configuration errors, help text.
mod cli;
// Keys in and out: ssh-add -l/-L/-d/-D/-t, certificates.
mod keys;
// Hostile and concurrent clients: garbage frames, huge lengths, other uids, floods.
mod robustness;
// Signing: ssh-keygen -Y sign/verify for every key type, sshd logins, ssh-add -h.
mod signing;
// Talking to the person: confirm (-c) through SSH_ASKPASS and pinentry, lock and unlock.
mod prompts;
// token-agent doctor: each check against a real broken setup and a sound one.
mod doctor;
