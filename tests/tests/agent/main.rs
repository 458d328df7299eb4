//! End-to-end tests of the agent front end: the real token-agent binary
//! against the real OpenSSH tools (ssh-add, ssh-keygen, ssh, sshd).

// Flags, background start, -k, command mode, configuration errors, help text.
mod cli;
// OpenSSH 10.x flags and signals next to 10.5's ssh-agent: ~/.ssh/agent sockets, -T, -u/-U, -V, SIGUSR1, socket activation.
mod agent_flags;
// Keys in and out: ssh-add -l/-L/-d/-D/-t, certificates.
mod keys;
// Hostile and concurrent clients: garbage frames, huge lengths, other uids, floods.
mod robustness;
// Signing: ssh-keygen -Y sign/verify for every key type, sshd logins, ssh-add -h.
mod signing;
// Talking to the person: confirm (-c) through SSH_ASKPASS and pinentry, lock and unlock.
mod prompts;
// OpenSSH 10.x parity, side by side with 10.5's ssh-agent: ML-DSA keys, host certificates, extensions.
mod openssh10;
// What a package ships beside the binary: man page and completions, systemd user units, environment.d.
mod dist;
// Why the agent refused: reasons kept for `token-agent status`, and who may ask.
mod status;
// Forwarding without fear: the [forwarding] policy over two loopback hops.
mod forwarding;
// token-agent doctor: each check against a real broken setup and a sound one.
mod doctor;
// Other agents behind token-agent: ssh-agent and gpg-agent upstreams, session binds passed on, [[listing]].
mod upstream;
// How the binaries are linked for a small resident set: day-to-day code first, packed relocations.
mod layout;
