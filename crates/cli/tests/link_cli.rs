//! Linking with the real `natter` binary against a real natterd: `link-companion` writes its QR code
//! to a PNG, `link PNG --yes` on the phone links it, `devices` lists both, `safety-number` agrees on
//! every device and on the other side, and `link` without `--yes` and without an answer refuses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use natter_testkit::TestServer;
use serde_json::Value;
use tokio::process::{Child, Command};

/// A safety net only.
const WAIT: Duration = Duration::from_secs(90);

const ALICE: &str = "+15550400001";
const BOB: &str = "+15550400002";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `natter --home HOME ARGS...` with a clean environment and stdin closed.
fn natter(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.env_remove("NATTER_HOME")
        .env_remove("NATTER_SERVER")
        .env_remove("NATTER_LOG")
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(home: &Path, args: &[&str]) -> Run {
    let out = tokio::time::timeout(WAIT, natter(home, args).output())
        .await
        .expect("natter finished in time")
        .expect("natter runs");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ok(r: &Run, what: &str) {
    assert_eq!(
        r.code, 0,
        "{what} failed: stdout {:?} stderr {:?}",
        r.stdout, r.stderr
    );
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

async fn register(server: &TestServer, home: &Path, phone: &str) {
    ok(
        &run(home, &["--server", &server.addr(), "register", phone]).await,
        "register",
    );
    let code = server.last_code(phone).expect("code in the SMS log");
    ok(&run(home, &["verify", &code]).await, "verify");
}

/// Starts `link-companion --qr PNG --name NAME` in the background and waits for the PNG.
async fn companion(server: &TestServer, home: &Path, png: &Path, name: &str) -> Child {
    let png_arg = png.display().to_string();
    let child = natter(
        home,
        &[
            "--server",
            &server.addr(),
            "--json",
            "link-companion",
            "--qr",
            &png_arg,
            "--name",
            name,
            "--timeout",
            "60",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("link-companion starts");
    tokio::time::timeout(WAIT, async {
        while !png.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("link-companion writes its QR code");
    child
}

async fn safety_number(home: &Path, peer: &str) -> String {
    let r = run(home, &["--json", "safety-number", peer]).await;
    ok(&r, "safety-number");
    let v = json_lines(&r.stdout);
    assert_eq!(v.len(), 1, "{}", r.stdout);
    assert_eq!(v[0]["peer"], peer);
    let digits = v[0]["safety_number"].as_str().unwrap().to_owned();
    assert_eq!(digits.len(), 60, "{digits}");
    assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{digits}");
    digits
}

async fn device_ids(home: &Path) -> Vec<Value> {
    let r = run(home, &["--json", "devices"]).await;
    ok(&r, "devices");
    json_lines(&r.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_a_laptop_by_qr_png_list_devices_and_compare_safety_numbers() {
    let server = TestServer::start().await;
    let alice = tempfile::tempdir().unwrap();
    let bob = tempfile::tempdir().unwrap();
    let laptop = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    register(&server, alice.path(), ALICE).await;
    register(&server, bob.path(), BOB).await;

    // The laptop shows its code (and writes it as a PNG); the phone links it from the PNG.
    let png = files.path().join("laptop.png");
    let laptop_run = companion(&server, laptop.path(), &png, "laptop").await;
    let png_arg = png.display().to_string();
    let r = run(alice.path(), &["--json", "link", &png_arg, "--yes"]).await;
    ok(&r, "link --yes");
    let linked = json_lines(&r.stdout);
    assert_eq!(linked.len(), 1, "{}", r.stdout);
    assert_eq!(linked[0]["status"], "linked");
    assert_eq!(linked[0]["device"], 2);
    assert_eq!(linked[0]["name"], "laptop");

    let out = tokio::time::timeout(WAIT, laptop_run.wait_with_output())
        .await
        .expect("link-companion ends once linked")
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "link-companion failed: {stdout:?} {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&stdout);
    assert!(lines[0]["qr"].as_str().unwrap().starts_with("natter-link:"));
    assert_eq!(lines[0]["png"], png_arg.as_str());
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "linked");
    assert_eq!(last["phone"], ALICE);
    assert_eq!(last["device"], 2);

    // Both devices, seen from either one.
    for (home, me) in [(alice.path(), 1), (laptop.path(), 2)] {
        let devices = device_ids(home).await;
        assert_eq!(devices.len(), 2, "{devices:?}");
        assert_eq!(devices[0]["device"], 1);
        assert_eq!(devices[0]["primary"], true);
        assert_eq!(devices[1]["device"], 2);
        assert_eq!(devices[1]["name"], "laptop");
        assert_eq!(devices[1]["primary"], false);
        for d in &devices {
            assert_eq!(d["this_device"], d["device"] == me);
        }
    }

    // One safety number, whichever of Alice's devices shows it, and the same on Bob's side.
    let on_phone = safety_number(alice.path(), BOB).await;
    assert_eq!(safety_number(laptop.path(), BOB).await, on_phone);
    assert_eq!(safety_number(bob.path(), ALICE).await, on_phone);

    // Without --yes, and with nobody to answer, `link` refuses and links nothing.
    let tablet = tempfile::tempdir().unwrap();
    let tablet_png = files.path().join("tablet.png");
    let mut tablet_run = companion(&server, tablet.path(), &tablet_png, "tablet").await;
    let r = run(alice.path(), &["link", &tablet_png.display().to_string()]).await;
    assert_ne!(r.code, 0, "link without --yes must refuse: {:?}", r.stdout);
    assert!(r.stderr.contains("[y/N]"), "{:?}", r.stderr);
    assert!(r.stderr.contains("cancelled"), "{:?}", r.stderr);
    tablet_run.kill().await.unwrap();
    assert_eq!(device_ids(alice.path()).await.len(), 2);
}

/// The JSON lines of a successful `natter --json ARGS...`.
async fn json_of(home: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let r = run(home, &all).await;
    ok(&r, &args.join(" "));
    json_lines(&r.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_state_commands_on_one_device_show_on_the_other() {
    let server = TestServer::start().await;
    let alice = tempfile::tempdir().unwrap();
    let bob = tempfile::tempdir().unwrap();
    let laptop = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    register(&server, alice.path(), ALICE).await;
    register(&server, bob.path(), BOB).await;
    let sent = json_of(alice.path(), &["send", BOB, "lunch?"]).await;
    let id = sent[0]["id"].as_str().unwrap().to_owned();

    let png = files.path().join("laptop.png");
    let laptop_run = companion(&server, laptop.path(), &png, "laptop").await;
    ok(
        &run(alice.path(), &["link", &png.display().to_string(), "--yes"]).await,
        "link --yes",
    );
    let out = tokio::time::timeout(WAIT, laptop_run.wait_with_output())
        .await
        .expect("link-companion ends once linked")
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Changes on the laptop...
    for args in [
        &["contact", "set-name", BOB, "Bob", "(work)"][..],
        &["pin", BOB],
        &["mute", BOB, "--for", "8h"],
        &["star", &id],
    ] {
        let mut tries = 0;
        loop {
            // The sync key reaches a new companion over Olm shortly after linking.
            let r = run(laptop.path(), args).await;
            if r.code == 0 {
                break;
            }
            tries += 1;
            assert!(
                tries < 50 && r.stderr.contains("sync key"),
                "{args:?}: {:?}",
                r.stderr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // ...and on the phone.
    ok(&run(alice.path(), &["archive", BOB]).await, "archive");

    // Every device shows the same.
    for home in [alice.path(), laptop.path()] {
        let contacts = json_of(home, &["contacts"]).await;
        assert!(
            contacts
                .iter()
                .any(|c| c["number"] == BOB && c["name"] == "Bob (work)"),
            "{contacts:?}"
        );
        let chats = json_of(home, &["chats"]).await;
        let chat = chats.iter().find(|c| c["chat"] == BOB).expect("bob's chat");
        assert_eq!(chat["pinned"], true, "{chat}");
        assert_eq!(chat["muted"], true, "{chat}");
        assert_eq!(chat["archived"], true, "{chat}");
        assert_eq!(chat["messages"], 1, "{chat}");
        let history = json_of(home, &["history", BOB]).await;
        let m = history.iter().find(|m| m["id"] == id.as_str()).unwrap();
        assert_eq!(m["starred"], true, "{m}");
    }

    // Undone on the phone, undone everywhere.
    ok(
        &run(alice.path(), &["pin", BOB, "--off"]).await,
        "pin --off",
    );
    ok(
        &run(alice.path(), &["mute", BOB, "--off"]).await,
        "mute --off",
    );
    let chats = json_of(laptop.path(), &["chats"]).await;
    let chat = chats.iter().find(|c| c["chat"] == BOB).unwrap();
    assert_eq!(
        (&chat["pinned"], &chat["muted"]),
        (&Value::Bool(false), &Value::Bool(false))
    );

    // Bad input: a clear error, nothing changed.
    let r = run(alice.path(), &["mute", BOB, "--for", "forever"]).await;
    assert_ne!(r.code, 0);
    assert!(!r.stderr.is_empty());
    let r = run(alice.path(), &["star", "not-an-id"]).await;
    assert_ne!(r.code, 0);
}
