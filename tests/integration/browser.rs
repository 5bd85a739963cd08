//! A real browser for the tests: headless Chromium driven through WebDriver (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs), to test the server-rendered web console as a person
//! sees it. Each [`Browser`] has a chromedriver of its own on a free loopback port and a profile
//! directory of its own, so tests that run in parallel do not share anything.
//!
//! The methods panic with the page's URL and the start of its text when something is not there: a
//! test reads as a list of steps, and a failure says where the page was.

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the methods that look for an element wait for it to appear: a server-rendered page is
/// there at once, so this only matters when something is wrong or slow (a loaded CI machine).
const ELEMENT_WAIT: Duration = Duration::from_secs(10);
/// How often the waits poll.
const POLL: Duration = Duration::from_millis(50);
/// Starting chromedriver takes well under a second; this is for a loaded machine.
const DRIVER_START: Duration = Duration::from_secs(20);

/// The page area the browser renders into, in CSS pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewport {
    pub width: u32,
    pub height: u32,
    /// Render as a phone does: honour `<meta name="viewport">` (a page without it is laid out 980
    /// pixels wide and scaled down, as on a real phone), overlay scroll bars, touch events.
    pub mobile: bool,
}

impl Viewport {
    pub const DESKTOP: Viewport = Viewport {
        width: 1280,
        height: 900,
        mobile: false,
    };
    pub const PHONE: Viewport = Viewport {
        width: 390,
        height: 844,
        mobile: true,
    };
}

/// A headless Chromium, its chromedriver and its profile; all of them go away on drop.
pub struct Browser {
    client: Client,
    // Never read: held for their drop, in this order: chromedriver and its Chromium are ended, then
    // the directory they write to is removed.
    _driver: Driver,
    _dir: tempfile::TempDir,
}

/// A running chromedriver; dropping it ends it and every Chromium it started.
struct Driver {
    /// The leader of a process group that also holds every Chromium process it starts, so that one
    /// signal ends them all.
    process: Child,
    /// Ends that group if this test process dies without dropping the driver (SIGKILL; Ctrl-C too,
    /// since chromedriver, in a group of its own, does not get the terminal's SIGINT).
    watchdog: Child,
}

impl Drop for Driver {
    fn drop(&mut self) {
        kill_process_group(self.process.id());
        let _ = self.process.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose page area is `viewport`.
    ///
    /// Panics, naming the binary, if `chromium` or `chromedriver` is not installed: the browser tests
    /// are part of the suite, and a suite that skipped them would pass without testing the console.
    pub async fn start(viewport: Viewport) -> Browser {
        let chromedriver = find_binary("chromedriver", "chromium-driver");
        let chromium = find_binary("chromium", "chromium");
        let dir = tempfile::Builder::new()
            .prefix("fhir-outbox-browser-")
            .tempdir()
            .expect("create the browser's temporary directory");
        // A panic from here on drops `driver` before `dir`, as a finished browser does.
        let (driver, port) = start_driver(&chromedriver, dir.path()).await;
        let profile = dir.path().join("profile");
        let client = match new_session(port, &chromium, &profile, viewport).await {
            Ok(client) => client,
            Err(error) => {
                // The directory goes with the panic, so what Chromium said is quoted here.
                let output = std::fs::read_to_string(dir.path().join("chromedriver.out"))
                    .unwrap_or_default();
                let lines: Vec<&str> = output.lines().collect();
                panic!(
                    "chromedriver could not start Chromium ({}): {error}\nthe end of their output:\n{}",
                    chromium.display(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            }
        };
        Browser {
            client,
            _driver: driver,
            _dir: dir,
        }
    }

    /// Loads `url` and waits until it has loaded.
    pub async fn open(&self, url: &str) {
        if let Err(error) = self.client.goto(url).await {
            panic!("cannot open {url}: {error}");
        }
    }

    /// The URL of the page shown, after redirects.
    pub async fn current_url(&self) -> url::Url {
        self.client
            .current_url()
            .await
            .expect("read the current URL")
    }

    /// The page's HTML as the browser has it now (after scripts ran).
    pub async fn page_source(&self) -> String {
        self.client.source().await.expect("read the page source")
    }

    /// The rendered text of the first element that matches `css` (waiting for it to appear). Like
    /// a person reading it: text hidden by CSS is not included.
    pub async fn text_of(&self, css: &str) -> String {
        let element = self.wait_for_element(css).await;
        match element.text().await {
            Ok(text) => text,
            Err(error) => panic!("cannot read the text of `{css}`: {error}"),
        }
    }

    /// The rendered texts of every element that matches `css` now (no waiting: an empty list is an
    /// answer, for checking that something is absent).
    pub async fn find_all(&self, css: &str) -> Vec<String> {
        let elements = self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("cannot look for `{css}`: {error}"));
        let mut texts = Vec::with_capacity(elements.len());
        for element in elements {
            texts.push(element.text().await.expect("read an element's text"));
        }
        texts
    }

    /// Clicks the first element that matches `css` (waiting for it to appear). For a click that
    /// loads another page, [`Browser::submit`] also waits for that page.
    pub async fn click(&self, css: &str) {
        let element = self.wait_for_element(css).await;
        if let Err(error) = element.click().await {
            panic!("cannot click `{css}`{}: {error}", self.whereabouts().await);
        }
    }

    /// Replaces the value of the text field or text area that matches `css` by typing `value`.
    pub async fn fill(&self, css: &str, value: &str) {
        let element = self.wait_for_element(css).await;
        if let Err(error) = element.clear().await {
            panic!("cannot clear `{css}`{}: {error}", self.whereabouts().await);
        }
        if let Err(error) = element.send_keys(value).await {
            panic!(
                "cannot type into `{css}`{}: {error}",
                self.whereabouts().await
            );
        }
    }

    /// Chooses the option whose `value` attribute is `value` in the `<select>` that matches `css`.
    pub async fn select(&self, css: &str, value: &str) {
        let element = self.wait_for_element(css).await;
        if let Err(error) = element.select_by_value(value).await {
            panic!(
                "cannot choose `{value}` in `{css}`{}: {error}",
                self.whereabouts().await
            );
        }
    }

    /// Clicks the element that matches `css` (a submit button, a link) and waits until the browser
    /// has loaded the page that the click leads to, as a person waits before reading on. A form
    /// posted to its own URL counts: what is waited for is a new document, not a new URL.
    pub async fn submit(&self, css: &str) {
        // A navigation replaces the page's `window`, so a mark on the old one tells them apart.
        self.client
            .execute("window.__fhirOutboxOldPage = true;", vec![])
            .await
            .expect("mark the page before submitting");
        self.click(css).await;
        let deadline = Instant::now() + ELEMENT_WAIT;
        let mut last = String::from("the old page is still shown");
        loop {
            // While the page changes, a script can fail (the document unloaded): that is "not yet".
            match self
                .client
                .execute(
                    "return window.__fhirOutboxOldPage === undefined \
                     && document.readyState === 'complete';",
                    vec![],
                )
                .await
            {
                Ok(serde_json::Value::Bool(true)) => return,
                Ok(_) => {}
                Err(error) => last = error.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "clicking `{css}` loaded no new page within {ELEMENT_WAIT:?} ({last}){}",
                    self.whereabouts().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until an element that matches `css` has a rendered text containing `needle`, and
    /// returns that text: for what appears after a while (a refresh, a script).
    pub async fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let texts = self.find_all(css).await;
            if let Some(text) = texts.iter().find(|text| text.contains(needle)) {
                return text.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no `{css}` showed {needle:?} within {timeout:?}; they show {texts:?}{}",
                    self.whereabouts().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves what the page area shows now as a PNG at `path`, to look at (a failing test can leave
    /// one behind) or to check that the page renders.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("take a screenshot");
        std::fs::write(path, png)
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
    }

    /// The WebDriver client, for what the methods above do not cover (running a script, cookies).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Ends the WebDriver session (Chromium quits cleanly), then chromedriver. Dropping the browser
    /// also ends everything, by killing the processes, since a destructor cannot wait for the
    /// session to close.
    pub async fn close(self) {
        // A failure here is only reported: dropping `self._driver` kills whatever is left.
        if let Err(error) = self.client.close().await {
            eprintln!("closing the browser session: {error}");
        }
    }

    async fn wait_for_element(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(ELEMENT_WAIT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(fantoccini::error::CmdError::WaitTimeout) => panic!(
                "no element matches `{css}` within {ELEMENT_WAIT:?}{}",
                self.whereabouts().await
            ),
            Err(error) => panic!(
                "cannot look for `{css}`: {error}{}",
                self.whereabouts().await
            ),
        }
    }

    /// " on URL, whose text starts: ...", for failure messages.
    async fn whereabouts(&self) -> String {
        let url = match self.client.current_url().await {
            Ok(url) => url.to_string(),
            Err(error) => return format!(" (the browser does not answer: {error})"),
        };
        let text = self
            .client
            .execute(
                "return document.body ? document.body.innerText : '';",
                vec![],
            )
            .await
            .ok()
            .and_then(|text| text.as_str().map(str::to_owned))
            .unwrap_or_default();
        let excerpt: String = text.chars().take(600).collect();
        format!(" on {url}, whose text starts:\n{excerpt}")
    }
}

/// `name` on PATH, else in /usr/bin (PATH can be narrowed by whoever runs the tests); panics naming
/// the Debian package otherwise.
fn find_binary(name: &str, package: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([Path::new("/usr/bin").join(name)])
        .find(|path| executable(path))
        .unwrap_or_else(|| {
            panic!(
                "the browser tests need `{name}`, which is neither on PATH nor in /usr/bin: install \
                 the Debian package {package} (.ci/run installs chromium, chromium-driver and \
                 fonts-dejavu-core)"
            )
        })
}

/// Starts chromedriver on a free loopback port and waits until it answers. The port is free when
/// chosen but another process can take it before chromedriver binds it; chromedriver then exits,
/// and another port is tried. Its own output saying it bound the port is what tells that the port
/// is its (a chromedriver of a parallel test could be answering there).
async fn start_driver(chromedriver: &Path, dir: &Path) -> (Driver, u16) {
    use std::os::unix::process::CommandExt;
    let output_path = dir.join("chromedriver.out");
    let mut last_output = String::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free loopback port")
            .port();
        let output =
            std::fs::File::create(&output_path).expect("create chromedriver's output file");
        let process = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            // Chromium's own messages come here too: it inherits chromedriver's stderr.
            .stdout(
                output
                    .try_clone()
                    .expect("share chromedriver's output file"),
            )
            .stderr(output)
            // A group of its own, which its Chromium joins: one signal ends them all (see Drop).
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", chromedriver.display()));
        // Owned by the guard at once, so that a panic or a cancelled test ends it.
        let mut driver = Driver {
            watchdog: spawn_watchdog(process.id(), dir),
            process,
        };
        let started = format!("started successfully on port {port}");
        let deadline = Instant::now() + DRIVER_START;
        loop {
            let output = std::fs::read_to_string(&output_path).unwrap_or_default();
            if let Ok(Some(status)) = driver.process.try_wait() {
                last_output = format!("it exited ({status}):\n{output}");
                break;
            }
            if output.contains(&started) && driver_ready(port).await {
                return (driver, port);
            }
            if Instant::now() >= deadline {
                panic!(
                    "chromedriver did not answer within {DRIVER_START:?}; its output:\n{output}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
    panic!(
        "chromedriver ({}) did not start: {last_output}",
        chromedriver.display()
    );
}

/// Whether chromedriver answers its status request saying it is ready for a session. It keeps the
/// connection open despite `Connection: close`, so the answer is read until it says so.
async fn driver_ready(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request =
        format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let read = async {
        let mut response = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&response).contains("\"ready\":true") {
                return true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .unwrap_or(false)
}

/// Opens a session: headless Chromium with its own profile, rendering into `viewport`.
async fn new_session(
    port: u16,
    chromium: &Path,
    profile: &Path,
    viewport: Viewport,
) -> Result<Client, fantoccini::error::NewSessionError> {
    let args = [
        "--headless=new".to_owned(),
        // Chromium's sandbox refuses to run as root, which CI is.
        "--no-sandbox".to_owned(),
        // /dev/shm is small in containers; Chromium crashes when it fills.
        "--disable-dev-shm-usage".to_owned(),
        "--disable-gpu".to_owned(),
        format!("--user-data-dir={}", profile.display()),
        // Headless windows are at least 500 pixels wide and their page area is smaller than the
        // window, so the viewport is set by the device metrics below; the window only has to be
        // large enough to hold it.
        format!(
            "--window-size={},{}",
            viewport.width.max(500),
            viewport.height + 200
        ),
        // The tests talk to loopback only, and nothing else may be reached (this machine's network
        // policy): no proxy from the environment, no component updates, and every host name but
        // localhost and 127.0.0.1 fails to resolve (an IP address included) instead of going out.
        "--no-proxy-server".to_owned(),
        "--disable-component-update".to_owned(),
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1".to_owned(),
    ];
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": args,
            "mobileEmulation": {
                "deviceMetrics": {
                    "width": viewport.width,
                    "height": viewport.height,
                    // One device pixel per CSS pixel: screenshots the size of the viewport.
                    "pixelRatio": 1,
                    "mobile": viewport.mobile,
                    "touch": viewport.mobile,
                },
            },
        },
        // A page that hangs fails the test in seconds rather than WebDriver's five minutes.
        "timeouts": { "pageLoad": 30_000, "script": 10_000 },
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!("a JSON object literal")
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
}

/// Kills the process group led by `leader` (chromedriver and its Chromium), through the shell's
/// `kill` since the standard library signals single processes only. Waits a little for them to be
/// gone, so that the profile directory is not written to while it is removed.
fn kill_process_group(leader: u32) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(
            r#"kill -s KILL -- "-$1" 2>/dev/null
               i=0
               while kill -0 -- "-$1" 2>/dev/null && [ "$i" -lt 40 ]; do sleep 0.05; i=$((i + 1)); done"#,
        )
        .arg("fhir-outbox-browser-kill")
        .arg(leader.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A shell that, once this test process is gone however it ended, kills the process group led by
/// `leader` and removes `dir` (the drop that would have done both did not run). In its own process
/// group, so that a Ctrl-C at the terminal does not end it first.
fn spawn_watchdog(leader: u32, dir: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        kill -s KILL -- "-$2" 2>/dev/null
        i=0
        while kill -0 -- "-$2" 2>/dev/null && [ "$i" -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
        rm -rf -- "$3"
    "#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("fhir-outbox-browser-watchdog")
        .arg(std::process::id().to_string())
        .arg(leader.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the browser watchdog")
}

/// The harness itself, on a tiny page served here: read, fill and post a form, wait for what a
/// script adds, take screenshots, at a desktop and a phone size, both browsers at once.
#[tokio::test]
async fn harness_drives_a_real_chromium() {
    use axum::Router;
    use axum::response::Html;
    use axum::routing::get;

    const FORM: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Harness</title></head>
<body>
<h1>Browser harness</h1>
<ul id="items"><li>alpha</li><li>beta</li><li>gamma</li></ul>
<form method="post" action="/greet">
  <label>Name <input id="name" name="name" value="to be replaced"></label>
  <select id="tone" name="tone"><option value="plain">Plain</option><option value="warm">Warm</option></select>
  <button type="submit">Greet</button>
</form>
</body></html>"#;

    async fn greet(body: String) -> Html<String> {
        let field = |wanted: &str| {
            url::form_urlencoded::parse(body.as_bytes())
                .find(|(name, _)| name == wanted)
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let escape = |text: String| {
            text.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        Html(format!(
            r#"<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Greeted</title></head>
<body><p id="greeting">Hello, {}!</p><p id="tone">{}</p><p id="later"></p>
<script>setTimeout(() => document.getElementById("later").textContent = "arrived later", 300);</script>
</body></html>"#,
            escape(field("name")),
            escape(field("tone")),
        ))
    }

    let app = Router::new()
        .route("/", get(|| async { Html(FORM) }))
        .route("/greet", axum::routing::post(greet));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let shots = tempfile::tempdir().unwrap();

    let drive = |viewport: Viewport| {
        let (base, shots) = (base.clone(), shots.path().to_owned());
        async move {
            let started = Instant::now();
            let browser = Browser::start(viewport).await;
            browser.open(&format!("{base}/")).await;
            assert_eq!(browser.text_of("h1").await, "Browser harness");
            assert_eq!(
                browser.find_all("#items li").await,
                ["alpha", "beta", "gamma"]
            );
            assert!(browser.find_all(".absent").await.is_empty());
            // The page is laid out at the width asked for (media queries see it).
            let width = browser
                .client()
                .execute("return window.innerWidth;", vec![])
                .await
                .unwrap();
            assert_eq!(width, json!(viewport.width));

            browser.fill("#name", "Ada & Grace").await;
            browser.select("#tone", "warm").await;
            browser.submit("button[type=submit]").await;
            assert_eq!(browser.current_url().await.path(), "/greet");
            assert_eq!(browser.text_of("#greeting").await, "Hello, Ada & Grace!");
            assert_eq!(browser.text_of("#tone").await, "warm");
            assert!(browser.page_source().await.contains("Ada &amp; Grace"));
            let later = browser
                .wait_for_text("#later", "arrived", Duration::from_secs(5))
                .await;
            assert_eq!(later, "arrived later");
            // `click` alone, on something that does not navigate.
            browser.click("#greeting").await;

            let shot = shots.join(format!("{}x{}.png", viewport.width, viewport.height));
            browser.screenshot(&shot).await;
            let png = std::fs::read(&shot).unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
            // The PNG's IHDR chunk holds its width and height: the viewport, one pixel per pixel.
            let dimension = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
            assert_eq!(
                (dimension(16), dimension(20)),
                (viewport.width, viewport.height)
            );
            browser.close().await;
            started.elapsed()
        }
    };
    let (desktop, phone) = tokio::join!(drive(Viewport::DESKTOP), drive(Viewport::PHONE));
    eprintln!("desktop browser: {desktop:?}, phone browser: {phone:?}");
    server.abort();
}
