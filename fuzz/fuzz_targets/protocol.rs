#![no_main]
//! Any bytes through gpod's request parser: it must return Ok or Err, never panic or hang.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let _ = gpo::daemon::protocol::parse_request(&line, &gpo::daemon::protocol::Limits::default());
});
