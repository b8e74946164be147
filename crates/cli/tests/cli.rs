//! The real `natter` binary against a real natterd on a loopback port: registration with codes from
//! the SMS log, send/recv/history/whoami (text and JSON), send-file/send-voice/download, configuration
//! through the environment, exit codes and messages of the failures scripts must tell apart, and the
//! interactive `chat`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use natter_client::MessageKind;
use natter_testkit::{TestClient, TestServer, next_message};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// A safety net only.
const WAIT: Duration = Duration::from_secs(20);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `natter` with a clean environment (no NATTER_* from the caller).
fn natter() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.env_remove("NATTER_HOME")
        .env_remove("NATTER_SERVER")
        .env_remove("NATTER_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Run {
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

/// `natter --home HOME [--server ADDR] ARGS...`
async fn natter_in(home: &Path, server: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = natter();
    cmd.arg("--home").arg(home);
    if let Some(s) = server {
        cmd.args(["--server", s]);
    }
    cmd.args(args);
    run(cmd).await
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

/// Registers `phone` in `home` through the CLI, with the code from the SMS log.
async fn register(server: &TestServer, home: &Path, phone: &str) {
    let r = natter_in(home, Some(&server.addr()), &["register", phone]).await;
    ok(&r, "register");
    assert!(r.stdout.contains("code sent"), "{}", r.stdout);
    let code = server.last_code(phone).expect("code in the SMS log");
    let r = natter_in(home, None, &["verify", &code]).await;
    ok(&r, "verify");
    assert!(r.stdout.contains("registered"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_send_recv_history_and_whoami() {
    let server = TestServer::start().await;
    let alice_home = tempfile::tempdir().unwrap();
    let bob_home = tempfile::tempdir().unwrap();
    let (alice, bob) = ("+15550006001", "+15550006002");
    register(&server, alice_home.path(), alice).await;

    // Bob configures everything through NATTER_HOME and NATTER_SERVER.
    let mut cmd = natter();
    cmd.env("NATTER_HOME", bob_home.path())
        .env("NATTER_SERVER", server.addr())
        .args(["register", bob]);
    ok(&run(cmd).await, "register with env vars");
    let code = server.last_code(bob).unwrap();
    let mut cmd = natter();
    cmd.env("NATTER_HOME", bob_home.path())
        .args(["--json", "verify", &code]);
    let r = run(cmd).await;
    ok(&r, "verify with env vars");
    let v = &json_lines(&r.stdout)[0];
    assert_eq!(v["status"], "registered");
    assert_eq!(v["phone"], bob);

    // whoami
    let r = natter_in(alice_home.path(), None, &["--json", "whoami"]).await;
    ok(&r, "whoami");
    let me = json_lines(&r.stdout);
    assert_eq!(me.len(), 1);
    assert_eq!(me[0]["phone"], alice);
    assert_eq!(me[0]["device"], 1);
    assert_eq!(me[0]["registered"], true);
    assert_eq!(me[0]["server"], server.addr());
    assert_eq!(me[0]["account_key"].as_str().unwrap().len(), 64);
    let r = natter_in(alice_home.path(), None, &["whoami"]).await;
    ok(&r, "whoami (text)");
    assert!(r.stdout.contains(alice) && r.stdout.contains("registered"));

    // send (text output names the id; JSON gives it as a field)
    let r = natter_in(alice_home.path(), None, &["send", bob, "hello", "Bob"]).await;
    ok(&r, "send");
    let first_id = r
        .stdout
        .rsplit_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("no id in {:?}", r.stdout));
    assert_eq!(first_id.len(), 32, "{}", r.stdout);
    let r = natter_in(
        alice_home.path(),
        None,
        &["--json", "send", bob, "second one"],
    )
    .await;
    ok(&r, "send --json");
    let sent = json_lines(&r.stdout);
    assert_eq!(sent.len(), 1);
    let second_id = sent[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(sent[0]["to"], bob);
    assert_eq!(sent[0]["status"], "sent");

    // recv prints each message once, one JSON object per line.
    let mut cmd = natter();
    cmd.env("NATTER_HOME", bob_home.path())
        .args(["recv", "--json"]);
    let r = run(cmd).await;
    ok(&r, "recv");
    let got = json_lines(&r.stdout);
    assert_eq!(got.len(), 2, "{}", r.stdout);
    for (m, (id, text)) in got
        .iter()
        .zip([(&first_id, "hello Bob"), (&second_id, "second one")])
    {
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["from"], alice);
        assert_eq!(m["text"], text);
        assert!(m["ts"].as_u64().unwrap() > 0);
    }
    let r = natter_in(bob_home.path(), None, &["--json", "recv"]).await;
    ok(&r, "second recv");
    assert_eq!(r.stdout, "", "nothing new the second time");

    // Alice collects Bob's receipts; her history shows both messages read.
    let r = natter_in(alice_home.path(), None, &["--json", "recv"]).await;
    ok(&r, "recv at Alice");
    assert_eq!(r.stdout, "", "receipts are not messages");
    let r = natter_in(alice_home.path(), None, &["--json", "history", bob]).await;
    ok(&r, "history");
    let hist = json_lines(&r.stdout);
    assert_eq!(hist.len(), 2);
    for (m, id) in hist.iter().zip([&first_id, &second_id]) {
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["from_me"], true);
        assert_eq!(m["from"], alice);
        assert_eq!(m["chat"], bob);
        assert_eq!(m["status"], "read");
    }
    let r = natter_in(bob_home.path(), None, &["history", alice]).await;
    ok(&r, "history (text)");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(
        lines[0].ends_with(&format!("{alice}: hello Bob")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with(&format!("{alice}: second one")),
        "{}",
        lines[1]
    );
}

/// A failed run: the expected exit code, and a message on stderr that says what went wrong.
fn fails(r: &Run, code: i32, says: &str) {
    assert_eq!(r.code, code, "stdout {:?} stderr {:?}", r.stdout, r.stderr);
    assert!(r.stderr.starts_with("natter: "), "{:?}", r.stderr);
    assert!(
        r.stderr.contains(says),
        "expected {says:?} in {:?}",
        r.stderr
    );
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "one clear line: {:?}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_distinct_exit_codes_and_clear_messages() {
    let server = TestServer::start().await;
    let addr = server.addr();

    // 3: not registered.
    let empty = tempfile::tempdir().unwrap();
    let r = natter_in(empty.path(), Some(&addr), &["send", "+15550006101", "hi"]).await;
    fails(&r, 3, "this device is not registered: run `natter register");
    let r = natter_in(empty.path(), None, &["whoami"]).await;
    fails(&r, 3, "not registered");

    // 4: server unreachable (a port nobody listens on).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let home = tempfile::tempdir().unwrap();
    let r = natter_in(home.path(), Some(&closed), &["register", "+15550006102"]).await;
    fails(&r, 4, &format!("cannot reach the server at {closed}"));

    // 6: wrong code.
    let home = tempfile::tempdir().unwrap();
    let phone = "+15550006103";
    ok(
        &natter_in(home.path(), Some(&addr), &["register", phone]).await,
        "register",
    );
    let code: u32 = server.last_code(phone).unwrap().parse().unwrap();
    let bad = format!("{:06}", (code + 1) % 1_000_000);
    let r = natter_in(home.path(), None, &["verify", &bad]).await;
    fails(&r, 6, "wrong code (4 attempts left)");
    // In JSON mode the error is also on stdout, machine-readable.
    let r = natter_in(home.path(), None, &["--json", "verify", &bad]).await;
    fails(&r, 6, "wrong code (3 attempts left)");
    let v = &json_lines(&r.stdout)[0];
    assert_eq!(v["exit_code"], 6);
    assert!(v["error"].as_str().unwrap().contains("wrong code"));

    // 7: unknown number.
    let alice = tempfile::tempdir().unwrap();
    register(&server, alice.path(), "+15550006104").await;
    let r = natter_in(alice.path(), None, &["send", "+15550006199", "anyone?"]).await;
    fails(&r, 7, "+15550006199 is not on Natter");

    // 8: invalid number, for send and for register (refused before anything is sent).
    let r = natter_in(alice.path(), None, &["send", "12345", "hi"]).await;
    fails(&r, 8, "invalid phone number \"12345\"");
    let r = natter_in(home.path(), Some(&addr), &["register", "+1 555"]).await;
    fails(&r, 8, "invalid phone number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sends_typed_lines_and_shows_incoming_ones() {
    let server = TestServer::start().await;
    let alice_home = tempfile::tempdir().unwrap();
    let alice = "+15550006201";
    register(&server, alice_home.path(), alice).await;
    let bob = TestClient::online(&server, "+15550006202").await;
    let mut bob_ev = bob.client.subscribe();

    let mut child = natter()
        .arg("--home")
        .arg(alice_home.path())
        .args(["chat", bob.phone.as_str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut wait_line = async |pred: &dyn Fn(&str) -> bool, seen: &mut Vec<String>| {
        tokio::time::timeout(WAIT, async {
            while let Some(l) = stdout.next_line().await.unwrap() {
                seen.push(l.clone());
                if pred(&l) {
                    return;
                }
            }
            panic!("chat ended early; output: {seen:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("timed out; output so far: {seen:?}"));
    };
    wait_line(&|l| l.contains("chatting with"), &mut seen).await;

    // A typed line goes to Bob.
    stdin.write_all(b"hello from the chat\n").await.unwrap();
    stdin.flush().await.unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| m.kind == MessageKind::Text).await;
    assert_eq!(got.text, "hello from the chat");
    assert_eq!(got.chat.as_str(), alice);
    wait_line(&|l| l.contains("sent to"), &mut seen).await;

    // Bob's answer appears on the chat's stdout.
    bob.client
        .send_text(&got.chat, "hello back from Bob")
        .await
        .unwrap();
    wait_line(&|l| l.contains("hello back from Bob"), &mut seen).await;
    let line = seen.last().unwrap();
    assert!(line.contains(bob.phone.as_str()), "{line}");

    // End of input ends the chat, successfully.
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("chat exits when stdin closes")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The conversation is in Alice's history.
    let r = natter_in(
        alice_home.path(),
        None,
        &["--json", "history", bob.phone.as_str()],
    )
    .await;
    ok(&r, "history");
    let texts: Vec<String> = json_lines(&r.stdout)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["hello from the chat", "hello back from Bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_file_send_voice_recv_and_download() {
    let server = TestServer::start().await;
    let alice_home = tempfile::tempdir().unwrap();
    let bob_home = tempfile::tempdir().unwrap();
    let (alice, bob) = ("+15550006101", "+15550006102");
    register(&server, alice_home.path(), alice).await;
    register(&server, bob_home.path(), bob).await;

    let files = tempfile::tempdir().unwrap();
    let pic = files.path().join("holiday.png");
    image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 99]))
        .save(&pic)
        .unwrap();
    let voice = files.path().join("note.ogg");
    let mut ogg = Vec::new();
    ogg.extend_from_slice(b"OggS\0\x02");
    ogg.extend_from_slice(&0u64.to_le_bytes());
    ogg.extend_from_slice(&[0; 13]);
    ogg.extend_from_slice(b"OpusHead\x01\x01");
    ogg.extend_from_slice(&0u16.to_le_bytes());
    ogg.extend_from_slice(&[0; 100]);
    ogg.extend_from_slice(b"OggS\0\x04");
    ogg.extend_from_slice(&(48u64 * 2_500).to_le_bytes());
    ogg.extend_from_slice(&[0; 20]);
    std::fs::write(&voice, &ogg).unwrap();

    let pic_arg = pic.to_str().unwrap();
    let r = natter_in(
        alice_home.path(),
        None,
        &["send-file", bob, pic_arg, "--caption", "look!"],
    )
    .await;
    ok(&r, "send-file");
    assert!(r.stdout.contains("sent to"), "{}", r.stdout);
    let r = natter_in(
        alice_home.path(),
        None,
        &["--json", "send-voice", bob, voice.to_str().unwrap()],
    )
    .await;
    ok(&r, "send-voice");

    let r = natter_in(bob_home.path(), None, &["--json", "recv", "--wait", "1"]).await;
    ok(&r, "recv");
    let got = json_lines(&r.stdout);
    let image = got.iter().find(|v| v["kind"] == "image").expect("image");
    assert_eq!(image["name"], "holiday.png");
    assert_eq!(image["mime"], "image/png");
    assert_eq!(image["caption"], "look!");
    assert_eq!(image["from"], alice);
    assert_eq!(image["size"], std::fs::metadata(&pic).unwrap().len());
    assert!(!image["thumbnail"].as_str().unwrap().is_empty());
    let note = got
        .iter()
        .find(|v| v["kind"] == "voice")
        .expect("voice note");
    assert_eq!(note["duration_ms"], 2_500);
    assert_eq!(note["name"], "note.ogg");

    let r = natter_in(bob_home.path(), None, &["history", alice]).await;
    ok(&r, "history");
    assert!(
        r.stdout.contains("📎 holiday.png (") && r.stdout.contains("\"look!\""),
        "{}",
        r.stdout
    );

    let out = tempfile::tempdir().unwrap();
    let id = image["id"].as_str().unwrap();
    let r = natter_in(
        bob_home.path(),
        None,
        &["download", id, "--to", out.path().to_str().unwrap()],
    )
    .await;
    ok(&r, "download");
    let saved = std::path::PathBuf::from(r.stdout.trim());
    assert_eq!(saved, out.path().join("holiday.png"));
    assert_eq!(std::fs::read(&saved).unwrap(), std::fs::read(&pic).unwrap());
    let r = natter_in(
        bob_home.path(),
        None,
        &["download", "00112233445566778899aabbccddeeff"],
    )
    .await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no media message"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_profile_presence_privacy_and_block() {
    let server = TestServer::start().await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice, bob) = ("+15550006101", "+15550006102");
    register(&server, a.path(), alice).await;
    register(&server, b.path(), bob).await;
    let files = tempfile::tempdir().unwrap();
    let json = |home: &Path, args: &'static [&'static str]| {
        let home = home.to_path_buf();
        async move {
            let mut all = vec!["--json"];
            all.extend_from_slice(args);
            let r = natter_in(&home, None, &all).await;
            ok(&r, &args.join(" "));
            json_lines(&r.stdout)
        }
    };

    // Alice's book: Bob (national format), a non-user, and a line that is not a number.
    let book = files.path().join("contacts.vcf");
    std::fs::write(
        &book,
        "BEGIN:VCARD\nVERSION:3.0\nFN:Bob\nTEL:(555) 000-6102\nEND:VCARD\n\
         BEGIN:VCARD\nVERSION:4.0\nFN:Nobody\nTEL;VALUE=uri:tel:+1-202-555-0199\nEND:VCARD\n\
         BEGIN:VCARD\nVERSION:3.0\nFN:Odd\nTEL:call me\nEND:VCARD\n",
    )
    .unwrap();
    let book_arg = book.display().to_string();
    let r = natter_in(
        a.path(),
        None,
        &["--json", "contacts", "import", &book_arg, "--region", "US"],
    )
    .await;
    ok(&r, "contacts import");
    let report = &json_lines(&r.stdout)[0];
    assert_eq!(report["numbers"], 2);
    assert_eq!(report["skipped"], 1);
    assert_eq!(report["on_natter"], serde_json::json!([bob]));
    assert!(
        r.stderr.contains("line 14") && r.stderr.contains("call me"),
        "{}",
        r.stderr
    );

    // Bob's book has Alice; Bob sets a profile; Alice sees it in her contacts.
    let bob_book = files.path().join("bob.csv");
    std::fs::write(&bob_book, format!("name,phone\nAlice,{alice}\n")).unwrap();
    let bob_book_arg = bob_book.display().to_string();
    ok(
        &natter_in(b.path(), None, &["contacts", "import", &bob_book_arg]).await,
        "bob's import",
    );
    let r = natter_in(
        b.path(),
        None,
        &["profile", "set", "--name", "Bobby", "--about", "on a boat"],
    )
    .await;
    ok(&r, "profile set");
    let mut tries = 0;
    loop {
        let contacts = json(a.path(), &["contacts"]).await;
        let c = contacts
            .iter()
            .find(|c| c["number"] == bob)
            .expect("bob listed");
        assert_eq!(c["name"], "Bob");
        assert_eq!(c["on_natter"], true);
        if c["profile_name"] == "Bobby" {
            assert_eq!(c["about"], "on a boat");
            break;
        }
        tries += 1;
        assert!(tries < 50, "{c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = natter_in(a.path(), None, &["--json", "profile", "show", bob]).await;
    ok(&r, "profile show");
    assert_eq!(json_lines(&r.stdout)[0]["name"], "Bobby");

    // Presence: Bob is offline (no process of his runs); hidden once he says nobody.
    let p = &json(a.path(), &["presence", "+15550006102"]).await[0];
    assert_eq!(p["presence"], "offline");
    assert!(p["last_seen"].as_u64().unwrap() > 0, "{p}");
    ok(
        &natter_in(b.path(), None, &["privacy", "last-seen", "nobody"]).await,
        "privacy last-seen",
    );
    let p = &json(a.path(), &["presence", "+15550006102"]).await[0];
    assert_eq!(p["presence"], "hidden");
    ok(
        &natter_in(b.path(), None, &["privacy", "read-receipts", "off"]).await,
        "privacy read-receipts",
    );
    let s = &json(b.path(), &["privacy"]).await[0];
    assert_eq!(s["last_seen"], "nobody");
    assert_eq!(s["read_receipts"], false);

    // A block: Bob's messages to Alice are refused.
    ok(&natter_in(a.path(), None, &["block", bob]).await, "block");
    let r = natter_in(b.path(), None, &["send", alice, "hello?"]).await;
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("does not accept"), "{}", r.stderr);
    assert_eq!(
        json(a.path(), &["privacy"]).await[0]["blocked"],
        serde_json::json!([bob])
    );
    ok(
        &natter_in(a.path(), None, &["unblock", bob]).await,
        "unblock",
    );
    ok(
        &natter_in(b.path(), None, &["send", alice, "hello!"]).await,
        "send after unblock",
    );

    // Bad input: clear errors.
    let r = natter_in(a.path(), None, &["privacy", "last-seen", "friends"]).await;
    assert_ne!(r.code, 0);
    let r = natter_in(a.path(), None, &["contacts", "import", "/no/such/file.vcf"]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/no/such/file.vcf"), "{}", r.stderr);
    let r = natter_in(a.path(), None, &["profile", "set"]).await;
    assert_ne!(r.code, 0);
}
