//! Being a middleware: the [`Provider`] trait, and the functions behind the
//! `sk_*` symbols [`export_provider!`](crate::export_provider) generates.
//!
//! The generated symbols only forward to the functions of this module, which
//! check every pointer OpenSSH passes for NULL, turn the arguments into Rust
//! values, call the provider with panics caught (a panic must not unwind into
//! C), and allocate the answer with `malloc(3)` so that OpenSSH can `free(3)`
//! it field by field, as it does with its own middleware's answers.
//!
//! Nothing here is meant to be called directly; it is public for the macro.

use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use libc::{c_char, c_int, c_void, size_t};

use crate::ffi;
use crate::{
    Algorithm, EnrollRequest, EnrollResponse, ResidentKey, SignRequest, SignResponse, SkError,
    SkOption,
};

/// A security-key middleware written in Rust.
///
/// The methods get the arguments of `sk_enroll`, `sk_sign` and
/// `sk_load_resident_keys` as Rust values and answer with owned values; the
/// C side (allocation, freeing, panics, NULL checks) is the generated code's
/// business. Implementations must follow the semantics of OpenSSH's own
/// middleware (`sk-usbhid.c`): `sign` hashes `data` with SHA-256 into the
/// clientDataHash, asks for presence only when the flags say
/// SSH_SK_USER_PRESENCE_REQD, and answers [`SkError::PinRequired`] both for a
/// missing and for a wrong PIN.
///
/// OpenSSH calls a middleware from one thread; the agent's helper does too.
pub trait Provider: Send + Sync + 'static {
    /// `sk_enroll`: makes a credential.
    fn enroll(&self, request: &EnrollRequest<'_>) -> Result<EnrollResponse, SkError>;

    /// `sk_sign`: signs with the credential whose handle the request carries.
    fn sign(&self, request: &SignRequest<'_>) -> Result<SignResponse, SkError>;

    /// `sk_load_resident_keys`: the resident credentials of the device.
    fn load_resident_keys(
        &self,
        pin: Option<&str>,
        options: &[SkOption],
    ) -> Result<Vec<ResidentKey>, SkError>;
}

/// Exports a [`Provider`] as the four functions of OpenSSH's middleware API.
///
/// `$provider` is a type implementing [`Provider`] and `Default`; one value is
/// made on the first call and lives as long as the library. Invoke the macro
/// once, in the crate built as the `cdylib` OpenSSH loads: it defines the
/// items `sk_api_version`, `sk_enroll`, `sk_sign`, `sk_load_resident_keys`
/// (the C names) and a hidden `__sk_provider` where it is invoked.
///
/// The expansion holds unsafe code (the `extern "C"` functions take raw
/// pointers) but its bodies only forward to [`crate::export`], where every use
/// of a pointer is checked and documented.
#[macro_export]
macro_rules! export_provider {
    ($provider:ty) => {
        #[doc(hidden)]
        fn __sk_provider() -> &'static $provider {
            static PROVIDER: ::std::sync::OnceLock<$provider> = ::std::sync::OnceLock::new();
            PROVIDER.get_or_init(<$provider as ::core::default::Default>::default)
        }

        /// `uint32_t sk_api_version(void)`.
        #[no_mangle]
        pub extern "C" fn sk_api_version() -> u32 {
            $crate::API_VERSION
        }

        /// `int sk_enroll(...)`, see sk-api.h.
        ///
        /// # Safety
        ///
        /// The arguments are what sk-api.h promises (valid pointers with
        /// their lengths, NUL-terminated strings, places for the answer).
        #[no_mangle]
        pub unsafe extern "C" fn sk_enroll(
            alg: u32,
            challenge: *const u8,
            challenge_len: usize,
            application: *const ::std::ffi::c_char,
            flags: u8,
            pin: *const ::std::ffi::c_char,
            options: *mut *mut $crate::ffi::sk_option,
            enroll_response: *mut *mut $crate::ffi::sk_enroll_response,
        ) -> ::std::ffi::c_int {
            // SAFETY: the caller passes the arguments sk-api.h describes;
            // `export::enroll` states and checks what it relies on.
            unsafe {
                $crate::export::enroll(
                    __sk_provider,
                    alg,
                    challenge,
                    challenge_len,
                    application,
                    flags,
                    pin,
                    options,
                    enroll_response,
                )
            }
        }

        /// `int sk_sign(...)`, see sk-api.h.
        ///
        /// # Safety
        ///
        /// The arguments are what sk-api.h promises (valid pointers with
        /// their lengths, NUL-terminated strings, places for the answer).
        #[no_mangle]
        pub unsafe extern "C" fn sk_sign(
            alg: u32,
            data: *const u8,
            data_len: usize,
            application: *const ::std::ffi::c_char,
            key_handle: *const u8,
            key_handle_len: usize,
            flags: u8,
            pin: *const ::std::ffi::c_char,
            options: *mut *mut $crate::ffi::sk_option,
            sign_response: *mut *mut $crate::ffi::sk_sign_response,
        ) -> ::std::ffi::c_int {
            // SAFETY: the caller passes the arguments sk-api.h describes;
            // `export::sign` states and checks what it relies on.
            unsafe {
                $crate::export::sign(
                    __sk_provider,
                    alg,
                    data,
                    data_len,
                    application,
                    key_handle,
                    key_handle_len,
                    flags,
                    pin,
                    options,
                    sign_response,
                )
            }
        }

        /// `int sk_load_resident_keys(...)`, see sk-api.h.
        ///
        /// # Safety
        ///
        /// The arguments are what sk-api.h promises (valid pointers with
        /// their lengths, NUL-terminated strings, places for the answer).
        #[no_mangle]
        pub unsafe extern "C" fn sk_load_resident_keys(
            pin: *const ::std::ffi::c_char,
            options: *mut *mut $crate::ffi::sk_option,
            rks: *mut *mut *mut $crate::ffi::sk_resident_key,
            nrks: *mut usize,
        ) -> ::std::ffi::c_int {
            // SAFETY: the caller passes the arguments sk-api.h describes;
            // `export::load_resident_keys` states and checks what it relies on.
            unsafe { $crate::export::load_resident_keys(__sk_provider, pin, options, rks, nrks) }
        }
    };
}

/// The most options a call may carry (OpenSSH passes two at most).
const MAX_OPTIONS: usize = 64;

/// `sk_enroll` for `provider`.
///
/// # Safety
///
/// As sk-api.h says: `challenge` points to `challenge_len` readable bytes (or
/// is NULL with 0), `application` and `pin` are NULL or NUL-terminated
/// strings, `options` is NULL or a NULL-terminated array of valid options,
/// and `enroll_response` is NULL or a writable place for the answer; all stay
/// valid for the call.
#[allow(clippy::too_many_arguments)] // The C prototype's arguments, one for one.
pub unsafe fn enroll<P: Provider>(
    provider: fn() -> &'static P,
    alg: u32,
    challenge: *const u8,
    challenge_len: size_t,
    application: *const c_char,
    flags: u8,
    pin: *const c_char,
    options: *mut *mut ffi::sk_option,
    enroll_response: *mut *mut ffi::sk_enroll_response,
) -> c_int {
    if enroll_response.is_null() {
        return SkError::General.code();
    }
    // SAFETY: non-NULL and writable per the contract.
    unsafe { enroll_response.write(ptr::null_mut()) };
    let answer = guarded(|| {
        let algorithm = Algorithm::from_code(alg).ok_or(SkError::Unsupported)?;
        // SAFETY: per the contract (pointer and length from the caller).
        let challenge = unsafe { borrow_bytes(challenge, challenge_len) }?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let application = unsafe { borrow_str(application) }?.ok_or(SkError::General)?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let pin = unsafe { borrow_pin(pin) }?;
        // SAFETY: NULL or a NULL-terminated array per the contract.
        let options = unsafe { read_options(options) }?;
        provider().enroll(&EnrollRequest {
            algorithm,
            challenge,
            application,
            flags,
            pin,
            options: &options,
        })
    });
    match answer {
        Ok(response) => match alloc_enroll_response(&response) {
            Some(allocated) => {
                // SAFETY: writable per the contract; OpenSSH now owns it.
                unsafe { enroll_response.write(allocated) };
                0
            }
            None => SkError::General.code(),
        },
        Err(err) => failure_code(err),
    }
}

/// `sk_sign` for `provider`.
///
/// # Safety
///
/// As sk-api.h says: `data` and `key_handle` point to their lengths in
/// readable bytes (or are NULL with 0), `application` and `pin` are NULL or
/// NUL-terminated strings, `options` is NULL or a NULL-terminated array of
/// valid options, and `sign_response` is NULL or a writable place for the
/// answer; all stay valid for the call.
#[allow(clippy::too_many_arguments)] // The C prototype's arguments, one for one.
pub unsafe fn sign<P: Provider>(
    provider: fn() -> &'static P,
    alg: u32,
    data: *const u8,
    data_len: size_t,
    application: *const c_char,
    key_handle: *const u8,
    key_handle_len: size_t,
    flags: u8,
    pin: *const c_char,
    options: *mut *mut ffi::sk_option,
    sign_response: *mut *mut ffi::sk_sign_response,
) -> c_int {
    if sign_response.is_null() {
        return SkError::General.code();
    }
    // SAFETY: non-NULL and writable per the contract.
    unsafe { sign_response.write(ptr::null_mut()) };
    let answer = guarded(|| {
        let algorithm = Algorithm::from_code(alg).ok_or(SkError::Unsupported)?;
        // SAFETY: per the contract (pointer and length from the caller).
        let data = unsafe { borrow_bytes(data, data_len) }?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let application = unsafe { borrow_str(application) }?.ok_or(SkError::General)?;
        // SAFETY: per the contract (pointer and length from the caller).
        let key_handle = unsafe { borrow_bytes(key_handle, key_handle_len) }?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let pin = unsafe { borrow_pin(pin) }?;
        // SAFETY: NULL or a NULL-terminated array per the contract.
        let options = unsafe { read_options(options) }?;
        provider().sign(&SignRequest {
            algorithm,
            data,
            application,
            key_handle,
            flags,
            pin,
            options: &options,
        })
    });
    match answer {
        Ok(response) => match alloc_sign_response(&response) {
            Some(allocated) => {
                // SAFETY: writable per the contract; OpenSSH now owns it.
                unsafe { sign_response.write(allocated) };
                0
            }
            None => SkError::General.code(),
        },
        Err(err) => failure_code(err),
    }
}

/// `sk_load_resident_keys` for `provider`.
///
/// # Safety
///
/// As sk-api.h says: `pin` is NULL or a NUL-terminated string, `options` is
/// NULL or a NULL-terminated array of valid options, and `rks` and `nrks` are
/// NULL or writable places for the array and its length.
pub unsafe fn load_resident_keys<P: Provider>(
    provider: fn() -> &'static P,
    pin: *const c_char,
    options: *mut *mut ffi::sk_option,
    rks: *mut *mut *mut ffi::sk_resident_key,
    nrks: *mut size_t,
) -> c_int {
    if rks.is_null() || nrks.is_null() {
        return SkError::General.code();
    }
    // SAFETY: both non-NULL and writable per the contract.
    unsafe {
        rks.write(ptr::null_mut());
        nrks.write(0);
    }
    let answer = guarded(|| {
        // SAFETY: NULL or NUL-terminated per the contract.
        let pin = unsafe { borrow_pin(pin) }?;
        // SAFETY: NULL or a NULL-terminated array per the contract.
        let options = unsafe { read_options(options) }?;
        provider().load_resident_keys(pin, &options)
    });
    match answer {
        Ok(keys) => match alloc_resident_keys(&keys) {
            Some((array, count)) => {
                // SAFETY: writable per the contract; OpenSSH now owns the array.
                unsafe {
                    rks.write(array);
                    nrks.write(count);
                }
                0
            }
            None => SkError::General.code(),
        },
        Err(err) => failure_code(err),
    }
}

/// Runs `f`, turning a panic into SSH_SK_ERR_GENERAL: unwinding into C is
/// undefined behaviour, and a middleware that aborts takes ssh-keygen with it.
fn guarded<T>(f: impl FnOnce() -> Result<T, SkError>) -> Result<T, SkError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(SkError::General))
}

/// The return value for `err`; never 0 or positive, which would mean success.
fn failure_code(err: SkError) -> c_int {
    match err.code() {
        code if code < 0 => code,
        _ => SkError::General.code(),
    }
}

/// The bytes at `data`, borrowed for the call.
///
/// # Safety
///
/// `data` is NULL or points to `len` readable bytes that outlive the borrow.
unsafe fn borrow_bytes<'a>(data: *const u8, len: size_t) -> Result<&'a [u8], SkError> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(SkError::General);
    }
    // SAFETY: non-NULL and `len` readable bytes per the contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// The string at `text` (None for NULL), borrowed for the call; not UTF-8 is an error.
///
/// # Safety
///
/// `text` is NULL or a NUL-terminated string that outlives the borrow.
unsafe fn borrow_str<'a>(text: *const c_char) -> Result<Option<&'a str>, SkError> {
    if text.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let text = unsafe { CStr::from_ptr(text) };
    text.to_str().map(Some).map_err(|_| SkError::General)
}

/// The PIN: None for NULL and for an empty string, which OpenSSH passes when
/// the person typed nothing (sending it would cost one of the PIN's tries).
///
/// # Safety
///
/// As [`borrow_str`].
unsafe fn borrow_pin<'a>(pin: *const c_char) -> Result<Option<&'a str>, SkError> {
    // SAFETY: the same contract.
    let pin = unsafe { borrow_str(pin) }?;
    Ok(pin.filter(|p| !p.is_empty()))
}

/// Copies the options out of OpenSSH's NULL-terminated array.
///
/// # Safety
///
/// `options` is NULL or a NULL-terminated array of pointers to valid
/// `sk_option`s whose strings are NULL or NUL-terminated.
unsafe fn read_options(options: *mut *mut ffi::sk_option) -> Result<Vec<SkOption>, SkError> {
    let mut read = Vec::new();
    if options.is_null() {
        return Ok(read);
    }
    for index in 0.. {
        if index == MAX_OPTIONS {
            return Err(SkError::General);
        }
        // SAFETY: the array is NULL-terminated and we stop at the NULL, so
        // every index up to it is inside the array.
        let option = unsafe { *options.add(index) };
        if option.is_null() {
            break;
        }
        // SAFETY: a valid option per the contract.
        let option = unsafe { &*option };
        // SAFETY: NULL or NUL-terminated per the contract.
        let name = unsafe { borrow_str(option.name) }?.ok_or(SkError::General)?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let value = unsafe { borrow_str(option.value) }?.unwrap_or_default();
        read.push(SkOption {
            name: name.to_owned(),
            value: value.to_owned(),
            required: option.required != 0,
        });
    }
    Ok(read)
}

/// A `malloc`ed copy of `bytes`, or (NULL, 0) for none; `None` when malloc fails.
fn malloc_copy(bytes: &[u8]) -> Option<(*mut u8, size_t)> {
    if bytes.is_empty() {
        return Some((ptr::null_mut(), 0));
    }
    // SAFETY: malloc of a non-zero size; the result is checked for NULL.
    let copy = unsafe { libc::malloc(bytes.len()) }.cast::<u8>();
    if copy.is_null() {
        return None;
    }
    // SAFETY: `copy` has room for `bytes.len()` bytes and does not overlap `bytes`.
    unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len()) };
    Some((copy, bytes.len()))
}

/// A zeroed `malloc`ed `T` (calloc): every pointer NULL, every number 0, a
/// valid value for the sk-api structures; NULL when calloc fails.
fn calloc_one<T>() -> *mut T {
    // SAFETY: calloc of one element of T's size; the caller checks for NULL.
    unsafe { libc::calloc(1, std::mem::size_of::<T>()) }.cast::<T>()
}

/// Frees `data` if non-NULL.
///
/// # Safety
///
/// `data` is NULL or a `malloc` allocation nothing else uses or frees.
unsafe fn free(data: *mut u8) {
    if !data.is_null() {
        // SAFETY: per the contract.
        unsafe { libc::free(data.cast::<c_void>()) };
    }
}

/// Fills `fields` with `malloc`ed copies of `response`; false (with nothing
/// left allocated) when malloc fails.
fn fill_enroll_fields(fields: &mut ffi::sk_enroll_response, response: &EnrollResponse) -> bool {
    fields.flags = response.flags;
    let buffers = [
        malloc_copy(&response.public_key),
        malloc_copy(&response.key_handle),
        malloc_copy(&response.signature),
        malloc_copy(&response.attestation_cert),
        malloc_copy(&response.authdata),
    ];
    if buffers.iter().any(Option::is_none) {
        for (data, _) in buffers.into_iter().flatten() {
            // SAFETY: just allocated by malloc_copy, owned by nobody else.
            unsafe { free(data) };
        }
        return false;
    }
    let [public_key, key_handle, signature, attestation_cert, authdata] =
        buffers.map(|b| b.unwrap_or((ptr::null_mut(), 0)));
    (fields.public_key, fields.public_key_len) = public_key;
    (fields.key_handle, fields.key_handle_len) = key_handle;
    (fields.signature, fields.signature_len) = signature;
    (fields.attestation_cert, fields.attestation_cert_len) = attestation_cert;
    (fields.authdata, fields.authdata_len) = authdata;
    true
}

/// Frees the buffers of `fields` (not the structure).
///
/// # Safety
///
/// The buffers are NULL or `malloc`ed and owned by `fields` alone.
unsafe fn free_enroll_fields(fields: &ffi::sk_enroll_response) {
    // SAFETY: each buffer is NULL or ours alone, per the contract.
    unsafe {
        free(fields.public_key);
        free(fields.key_handle);
        free(fields.signature);
        free(fields.attestation_cert);
        free(fields.authdata);
    }
}

fn alloc_enroll_response(response: &EnrollResponse) -> Option<*mut ffi::sk_enroll_response> {
    let allocated = calloc_one::<ffi::sk_enroll_response>();
    if allocated.is_null() {
        return None;
    }
    // SAFETY: a zeroed, valid, exclusively owned structure.
    if fill_enroll_fields(unsafe { &mut *allocated }, response) {
        Some(allocated)
    } else {
        // SAFETY: calloc'ed above, filled with nothing.
        unsafe { libc::free(allocated.cast::<c_void>()) };
        None
    }
}

fn alloc_sign_response(response: &SignResponse) -> Option<*mut ffi::sk_sign_response> {
    let allocated = calloc_one::<ffi::sk_sign_response>();
    if allocated.is_null() {
        return None;
    }
    let (r, s) = (malloc_copy(&response.sig_r), malloc_copy(&response.sig_s));
    let (Some(r), Some(s)) = (r, s) else {
        // SAFETY: the structure was calloc'ed above and whichever copy
        // succeeded was malloc'ed just now; all are ours alone.
        unsafe {
            free(r.map_or(ptr::null_mut(), |r| r.0));
            free(s.map_or(ptr::null_mut(), |s| s.0));
            libc::free(allocated.cast::<c_void>());
        }
        return None;
    };
    // SAFETY: a zeroed, valid, exclusively owned structure.
    let fields = unsafe { &mut *allocated };
    fields.flags = response.flags;
    fields.counter = response.counter;
    (fields.sig_r, fields.sig_r_len) = r;
    (fields.sig_s, fields.sig_s_len) = s;
    Some(allocated)
}

/// The array `sk_load_resident_keys` returns: NULL and 0 for no keys, else
/// `keys.len()` `malloc`ed structures in a `malloc`ed array.
fn alloc_resident_keys(keys: &[ResidentKey]) -> Option<(*mut *mut ffi::sk_resident_key, size_t)> {
    if keys.is_empty() {
        return Some((ptr::null_mut(), 0));
    }
    // SAFETY: calloc of `keys.len()` pointers; checked for NULL below.
    let array =
        unsafe { libc::calloc(keys.len(), std::mem::size_of::<*mut ffi::sk_resident_key>()) }
            .cast::<*mut ffi::sk_resident_key>();
    if array.is_null() {
        return None;
    }
    for (index, key) in keys.iter().enumerate() {
        match alloc_resident_key(key) {
            Some(allocated) => {
                // SAFETY: index < keys.len(), the array's length.
                unsafe { array.add(index).write(allocated) };
            }
            None => {
                // SAFETY: the first `index` entries are ours (the rest NULL).
                unsafe { free_resident_keys(array, index) };
                return None;
            }
        }
    }
    Some((array, keys.len()))
}

fn alloc_resident_key(key: &ResidentKey) -> Option<*mut ffi::sk_resident_key> {
    if key.application.as_bytes().contains(&0) {
        return None;
    }
    let allocated = calloc_one::<ffi::sk_resident_key>();
    if allocated.is_null() {
        return None;
    }
    // SAFETY: a zeroed, valid, exclusively owned structure.
    let fields = unsafe { &mut *allocated };
    fields.alg = key.alg;
    fields.slot = key.slot;
    fields.flags = key.flags;
    let mut application = key.application.as_bytes().to_vec();
    application.push(0);
    let filled = match (malloc_copy(&application), malloc_copy(&key.user_id)) {
        (Some((text, _)), Some((user_id, user_id_len))) => {
            fields.application = text.cast::<c_char>();
            fields.user_id = user_id;
            fields.user_id_len = user_id_len;
            fill_enroll_fields(&mut fields.key, &key.key)
        }
        (text, user_id) => {
            // SAFETY: whichever was allocated is ours alone.
            unsafe {
                free(text.map_or(ptr::null_mut(), |t| t.0));
                free(user_id.map_or(ptr::null_mut(), |u| u.0));
            }
            false
        }
    };
    if filled {
        Some(allocated)
    } else {
        // SAFETY: the structure and whatever it points to are ours alone.
        unsafe {
            free(fields.application.cast::<u8>());
            free(fields.user_id);
            libc::free(allocated.cast::<c_void>());
        }
        None
    }
}

/// Frees the first `count` entries of `array` and the array.
///
/// # Safety
///
/// `array` is a `malloc`ed array whose first `count` entries are complete
/// structures from [`alloc_resident_key`], owned by nobody else.
unsafe fn free_resident_keys(array: *mut *mut ffi::sk_resident_key, count: usize) {
    for index in 0..count {
        // SAFETY: index < count, within the array.
        let key = unsafe { *array.add(index) };
        if key.is_null() {
            continue;
        }
        // SAFETY: a complete structure per the contract.
        unsafe {
            let fields = &*key;
            free(fields.application.cast::<u8>());
            free(fields.user_id);
            free_enroll_fields(&fields.key);
            libc::free(key.cast::<c_void>());
        }
    }
    // SAFETY: the array came from calloc.
    unsafe { libc::free(array.cast::<c_void>()) };
}
