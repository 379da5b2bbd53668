//! libnbd's Python bindings, and the probe script every NBD test shares.

use std::process::{Command, Stdio};

/// A Python 3 that can `import nbd` (python3-libnbd). The first `python3` on
/// PATH may be a pyenv or virtualenv one without the system package, which
/// also breaks `nbdsh` (a `python3 -m nbd` wrapper); so the scripts run with
/// whichever interpreter has the module.
pub fn libnbd_python() -> &'static str {
    static FOUND: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        ["python3", "/usr/bin/python3"]
            .into_iter()
            .find(|python| {
                Command::new(python)
                    .args(["-c", "import nbd"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("no python3 can import nbd: install python3-libnbd")
    })
}

/// `python3 -c SCRIPT` with libnbd's bindings, ready for the script's arguments.
pub fn python(script: &str) -> Command {
    let mut cmd = Command::new(libnbd_python());
    cmd.arg("-c").arg(script);
    cmd
}

/// argv: URI PROBE... where a probe is `OP:OFFSET:COUNT:EXPECTED`, OP one of
/// pread, pwrite, trim, zero; OFFSET and COUNT Python expressions in `size`;
/// EXPECTED `ok` or an errno name. Strict mode off, so libnbd sends what it
/// would refuse itself; all probes share one connection.
pub const PROBES: &str = r#"
import sys
import nbd

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
actions = {
    "pread": lambda offset, count: h.pread(count, offset),
    "pwrite": lambda offset, count: h.pwrite(b"\x5a" * count, offset),
    "trim": lambda offset, count: h.trim(count, offset),
    "zero": lambda offset, count: h.zero(count, offset),
}
unexpected = 0
for probe in sys.argv[2:]:
    op, offset, count, want = probe.split(":")
    offset, count = (eval(x, {"size": size}) for x in (offset, count))
    try:
        actions[op](offset, count)
        got = "ok"
    except nbd.Error as e:
        got = e.errno or str(e)
    verdict = "as expected" if got == want else f"UNEXPECTED, wanted {want}"
    print(f"{op} {count} bytes at {offset}: {got} ({verdict})")
    unexpected += got != want
sys.exit(1 if unexpected else 0)
"#;
