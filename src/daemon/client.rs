//! A small blocking gpod client (tests, benchmarks, and Rust programs talking to a daemon).

use super::protocol::VERSION;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// One connection to gpod.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next: u64,
}

impl Client {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|e| Error::io(path, e))?;
        let w = s.try_clone().map_err(|e| Error::io(path, e))?;
        Ok(Client { reader: BufReader::new(s), writer: w, next: 0 })
    }

    /// Sends a raw line (a newline is added).
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        self.writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.write_all(b"\n"))
            .map_err(|e| Error::io("gpod socket", e))
    }

    /// Reads the next line as JSON.
    pub fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| Error::io("gpod socket", e))?;
        if n == 0 {
            return Err(Error::EngineStopped("gpod closed the connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| Error::invalid("reply", format!("not JSON ({e}): {line}")))
    }

    /// Sends `{"op": …, …}` (version and a fresh id added) and returns the reply object; events
    /// for this request go to `on_event`.
    pub fn call_with(&mut self, mut req: Value, mut on_event: impl FnMut(&Value)) -> Result<Value> {
        self.next += 1;
        let id = json!(self.next);
        req["v"] = json!(VERSION);
        req["id"] = id.clone();
        self.send_line(&req.to_string())?;
        loop {
            let v = self.read()?;
            if v.get("id") != Some(&id) {
                continue;
            }
            if v.get("event").is_some() {
                on_event(&v);
                continue;
            }
            return Ok(v);
        }
    }

    /// [`Client::call_with`] ignoring events.
    pub fn call(&mut self, req: Value) -> Result<Value> {
        self.call_with(req, |_| {})
    }
}
