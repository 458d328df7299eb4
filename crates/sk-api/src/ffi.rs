//! The C side of OpenSSH's `sk-api.h` (revision 1.15, API version
//! 0x000a0000, OpenSSH 8.9 and later, 10.5 included): the structures a
//! middleware returns and the signatures of the four functions it exports.
//!
//! Every pointer in these structures is owned by whoever allocated it with
//! `malloc(3)`; OpenSSH releases what a middleware returns with `free(3)`, field
//! by field and then the structure, so both sides must use the C allocator.
//! Lengths are `size_t`, flags `uint8_t`, as in the header.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, size_t};

/// `struct sk_enroll_response`: a new credential (`sk_enroll`), or the key of
/// a resident credential (inside [`sk_resident_key`]).
#[repr(C)]
#[derive(Debug)]
pub struct sk_enroll_response {
    /// The SSH_SK_* flags the key file will carry (the middleware may add
    /// SSH_SK_USER_VERIFICATION_REQD when the device demands it).
    pub flags: u8,
    /// The public key: 32 bytes for Ed25519, a SEC1 uncompressed point for ECDSA P-256.
    pub public_key: *mut u8,
    /// Its length.
    pub public_key_len: size_t,
    /// The key handle (FIDO credential id).
    pub key_handle: *mut u8,
    /// Its length.
    pub key_handle_len: size_t,
    /// The attestation signature, if any.
    pub signature: *mut u8,
    /// Its length.
    pub signature_len: size_t,
    /// The attestation certificate (DER), if any.
    pub attestation_cert: *mut u8,
    /// Its length.
    pub attestation_cert_len: size_t,
    /// The authenticator data of the attestation, if any.
    pub authdata: *mut u8,
    /// Its length.
    pub authdata_len: size_t,
}

/// `struct sk_sign_response`: an assertion (`sk_sign`).
#[repr(C)]
#[derive(Debug)]
pub struct sk_sign_response {
    /// The authenticator flags (UP 0x01, UV 0x04).
    pub flags: u8,
    /// The signature counter.
    pub counter: u32,
    /// Ed25519: the 64-byte signature. ECDSA: the big-endian integer r.
    pub sig_r: *mut u8,
    /// Its length.
    pub sig_r_len: size_t,
    /// ECDSA: the big-endian integer s. Ed25519: NULL.
    pub sig_s: *mut u8,
    /// Its length.
    pub sig_s_len: size_t,
}

/// `struct sk_resident_key`: one credential stored on a device
/// (`sk_load_resident_keys`).
#[repr(C)]
#[derive(Debug)]
pub struct sk_resident_key {
    /// SSH_SK_ECDSA or SSH_SK_ED25519.
    pub alg: u32,
    /// The middleware's index of the credential.
    pub slot: size_t,
    /// The application (FIDO relying party id), a NUL-terminated string.
    pub application: *mut c_char,
    /// The public key and key handle (flags and attestation fields unused).
    pub key: sk_enroll_response,
    /// SSH_SK_USER_VERIFICATION_REQD when the credential needs the PIN.
    pub flags: u8,
    /// The user id the credential was made for.
    pub user_id: *mut u8,
    /// Its length.
    pub user_id_len: size_t,
}

/// `struct sk_option`: a named option (`device`, `user`) passed in a
/// NULL-terminated array; `required` options a middleware does not know make
/// the call fail.
#[repr(C)]
#[derive(Debug)]
pub struct sk_option {
    /// The option's name, NUL-terminated.
    pub name: *mut c_char,
    /// Its value, NUL-terminated.
    pub value: *mut c_char,
    /// Non-zero when a middleware that does not know it must refuse.
    pub required: u8,
}

/// `uint32_t sk_api_version(void)`.
pub type sk_api_version_fn = unsafe extern "C" fn() -> u32;

/// `int sk_enroll(uint32_t alg, const uint8_t *challenge, size_t
/// challenge_len, const char *application, uint8_t flags, const char *pin,
/// struct sk_option **options, struct sk_enroll_response **enroll_response)`.
pub type sk_enroll_fn = unsafe extern "C" fn(
    alg: u32,
    challenge: *const u8,
    challenge_len: size_t,
    application: *const c_char,
    flags: u8,
    pin: *const c_char,
    options: *mut *mut sk_option,
    enroll_response: *mut *mut sk_enroll_response,
) -> c_int;

/// `int sk_sign(uint32_t alg, const uint8_t *data, size_t data_len, const
/// char *application, const uint8_t *key_handle, size_t key_handle_len,
/// uint8_t flags, const char *pin, struct sk_option **options, struct
/// sk_sign_response **sign_response)`.
pub type sk_sign_fn = unsafe extern "C" fn(
    alg: u32,
    data: *const u8,
    data_len: size_t,
    application: *const c_char,
    key_handle: *const u8,
    key_handle_len: size_t,
    flags: u8,
    pin: *const c_char,
    options: *mut *mut sk_option,
    sign_response: *mut *mut sk_sign_response,
) -> c_int;

/// `int sk_load_resident_keys(const char *pin, struct sk_option **options,
/// struct sk_resident_key ***rks, size_t *nrks)`.
pub type sk_load_resident_keys_fn = unsafe extern "C" fn(
    pin: *const c_char,
    options: *mut *mut sk_option,
    rks: *mut *mut *mut sk_resident_key,
    nrks: *mut size_t,
) -> c_int;

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    // The layouts a C compiler gives sk-api.h's structures on LP64 Linux
    // (x86_64, aarch64): a u8 then pointers, padded to 8.
    #[test]
    fn layouts_match_the_c_header_on_lp64() {
        assert_eq!(offset_of!(sk_enroll_response, flags), 0);
        assert_eq!(offset_of!(sk_enroll_response, public_key), 8);
        assert_eq!(offset_of!(sk_enroll_response, authdata_len), 80);
        assert_eq!(size_of::<sk_enroll_response>(), 88);

        assert_eq!(offset_of!(sk_sign_response, counter), 4);
        assert_eq!(offset_of!(sk_sign_response, sig_r), 8);
        assert_eq!(offset_of!(sk_sign_response, sig_s_len), 32);
        assert_eq!(size_of::<sk_sign_response>(), 40);

        assert_eq!(offset_of!(sk_resident_key, slot), 8);
        assert_eq!(offset_of!(sk_resident_key, application), 16);
        assert_eq!(offset_of!(sk_resident_key, key), 24);
        assert_eq!(offset_of!(sk_resident_key, flags), 112);
        assert_eq!(offset_of!(sk_resident_key, user_id), 120);
        assert_eq!(size_of::<sk_resident_key>(), 136);

        assert_eq!(offset_of!(sk_option, required), 16);
        assert_eq!(size_of::<sk_option>(), 24);
    }
}
