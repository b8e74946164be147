//! `natter group …` and `natter groups` against a real natterd: create (the id, in text and JSON), send,
//! `recv` showing group, sender and device, non-admin refusals with their exit code, add, promote,
//! rename, leave, remove, and the per-member receipts of `group info --message`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use natter_testkit::TestServer;
use serde_json::Value;
use tokio::process::Command;

/// A safety net only.
const WAIT: Duration = Duration::from_secs(30);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn natter_in(home: &Path, server: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.env_remove("NATTER_HOME")
        .env_remove("NATTER_SERVER")
        .env_remove("NATTER_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .arg("--home")
        .arg(home);
    if let Some(s) = server {
        cmd.args(["--server", s]);
    }
    cmd.args(args);
    let out = tokio::time::timeout(WAIT, cmd.output())
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
        &natter_in(home, Some(&server.addr()), &["register", phone]).await,
        "register",
    );
    let code = server.last_code(phone).expect("code in the SMS log");
    ok(&natter_in(home, None, &["verify", &code]).await, "verify");
}

/// `recv --json` until a line with this text shows up.
async fn recv_text(home: &Path, text: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = natter_in(home, None, &["--json", "recv", "--wait", "1"]).await;
        ok(&r, "recv");
        if let Some(v) = json_lines(&r.stdout)
            .into_iter()
            .find(|v| v["text"] == text)
        {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{text:?} never arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands() {
    let server = TestServer::start().await;
    let (a, b, c, d) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (alice, bob, carol, dave) = (
        "+15550007001",
        "+15550007002",
        "+15550007003",
        "+15550007004",
    );
    for (home, phone) in [(&a, alice), (&b, bob), (&c, carol), (&d, dave)] {
        register(&server, home.path(), phone).await;
    }

    // Create prints the id (as text, and as {"id": …} with --json).
    let r = natter_in(a.path(), None, &["group", "create", "Family", bob, carol]).await;
    ok(&r, "group create");
    let id = r.stdout.trim().to_owned();
    assert_eq!(id.len(), 32, "{id:?}");
    let r = natter_in(a.path(), None, &["--json", "group", "create", "Work", bob]).await;
    ok(&r, "group create --json");
    let work = json_lines(&r.stdout)[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(work.len(), 32);
    assert_ne!(work, id);

    let r = natter_in(
        a.path(),
        None,
        &["--json", "group", "send", &id, "dinner", "at", "8?"],
    )
    .await;
    ok(&r, "group send");
    let sent = &json_lines(&r.stdout)[0];
    assert_eq!(sent["group"], id.as_str());
    assert_eq!(sent["status"], "sent");
    let message_id = sent["id"].as_str().unwrap().to_owned();

    // recv shows group, sender and device, with the 1:1 fields.
    let v = recv_text(b.path(), "dinner at 8?").await;
    assert_eq!(v["group"], id.as_str());
    assert_eq!(v["chat"], id.as_str());
    assert_eq!(v["group_name"], "Family");
    assert_eq!(v["from"], alice);
    assert_eq!(v["device"], 1);
    assert_eq!(v["kind"], "text");
    assert_eq!(v["from_me"], false);
    let r = natter_in(c.path(), None, &["recv"]).await;
    ok(&r, "recv (text)");
    assert!(
        r.stdout
            .contains(&format!("Family / {alice} (device 1): dinner at 8?")),
        "{}",
        r.stdout
    );

    // Receipts per member: bob and carol received it; both read it (recv printed it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = natter_in(
            a.path(),
            None,
            &["--json", "group", "info", &id, "--message", &message_id],
        )
        .await;
        ok(&r, "group info --message");
        let v = &json_lines(&r.stdout)[0];
        assert_eq!(v["members"], 2);
        if v["read"] == 2 {
            assert_eq!(v["delivered"], 2);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "receipts: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = natter_in(
        a.path(),
        None,
        &["group", "info", "Family", "--message", &message_id],
    )
    .await;
    ok(&r, "group info --message (text)");
    assert!(r.stdout.contains("read by 2/2"), "{}", r.stdout);

    // A member who is not an admin is refused (and the group is named by its name).
    let r = natter_in(b.path(), None, &["group", "add", "Family", dave]).await;
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("admins"), "{}", r.stderr);

    // Admin actions.
    ok(
        &natter_in(a.path(), None, &["group", "add", &id, dave]).await,
        "group add",
    );
    ok(
        &natter_in(a.path(), None, &["group", "promote", &id, bob]).await,
        "group promote",
    );
    let r = natter_in(
        b.path(),
        None,
        &["--json", "group", "rename", &id, "Famille"],
    )
    .await;
    ok(&r, "rename by the new admin");
    assert_eq!(json_lines(&r.stdout)[0]["name"], "Famille");
    ok(
        &natter_in(a.path(), None, &["group", "remove", &id, carol]).await,
        "group remove",
    );
    let r = natter_in(d.path(), None, &["--json", "group", "leave", &id]).await;
    ok(&r, "group leave");
    assert_eq!(json_lines(&r.stdout)[0]["left"], true);

    let r = natter_in(a.path(), None, &["--json", "group", "info", &id]).await;
    ok(&r, "group info");
    let info = &json_lines(&r.stdout)[0];
    assert_eq!(info["name"], "Famille");
    let members: Vec<(String, bool)> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["number"].as_str().unwrap().to_owned(),
                m["admin"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        members,
        vec![(alice.to_owned(), true), (bob.to_owned(), true)]
    );

    // Carol was removed: what follows does not reach her; she sees the notice.
    ok(
        &natter_in(a.path(), None, &["group", "send", &id, "after", "carol"]).await,
        "send after removal",
    );
    recv_text(b.path(), "after carol").await;
    let r = natter_in(c.path(), None, &["--json", "recv", "--wait", "1"]).await;
    ok(&r, "carol's recv");
    let lines = json_lines(&r.stdout);
    assert!(
        lines.iter().all(|v| v["text"] != "after carol"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|v| v["kind"] == "notice" && v["text"].as_str().unwrap().contains("removed")),
        "{lines:?}"
    );
    let r = natter_in(c.path(), None, &["group", "send", &id, "hello?"]).await;
    assert_eq!(r.code, 8, "{} {}", r.stdout, r.stderr);

    // groups lists both, current ones first.
    let r = natter_in(b.path(), None, &["--json", "groups"]).await;
    ok(&r, "groups");
    let names: Vec<String> = json_lines(&r.stdout)
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["Famille", "Work"]);
}
