//! A Quectel-style modem played on the serial port of a QEMU-emulated board.
//!
//! QEMU runs the real firmware image (`-machine mps2-an386`) with UART0 on its stdin/stdout
//! (`-serial stdio`). This simulator answers the AT commands the firmware sends — echo on,
//! `RDY` and `+CPIN: READY` at power-on — keeps byte counters that move with simulated
//! traffic (and with the modem's own MQTT traffic, as a real modem counts it), advances a
//! simulated network clock on each `AT+CCLK?`, and turns each `AT+QMTPUB` into a real QoS 1
//! publish to an MQTT broker, answering `OK` and `+QMTPUB: <idx>,<msgID>,0` after the PUBACK.
//!
//! The board's checkpoint log lives in `countersign-flash.bin` in the work directory (the
//! firmware opens it via semihosting), so a new [`ModemSim::boot`] on the same directory is a
//! power cycle of the same device.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_meter::budget::report_air_bytes;
use countersign_meter::Report;
use rand::{Rng, SeedableRng};

/// Seconds the simulated network clock advances per `AT+CCLK?` while traffic flows.
pub const SIM_CLOCK_STEP_S: u64 = 600;
/// Most application bytes per direction added between two counter readings.
pub const SIM_TRAFFIC_STEP_BYTES_MAX: u64 = 16 * 1024;
/// Longest AT command line the simulator accepts.
const COMMAND_BYTES_MAX: usize = 512;
/// How long to wait for the broker's PUBACK before reporting the publish failed.
const PUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One report the modem delivered to the broker.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// The decoded report (structure only; the endpoint verifies the tag).
    pub report: Report,
    /// The counters the modem gave in the last `AT+QGDCNT?` before this publish.
    pub counters_before: (u64, u64),
    /// How many counter readings the firmware had made when this report was delivered: a
    /// later reading means the firmware is past its post-delivery checkpoint.
    pub answers_at_delivery: usize,
}

/// What the test observes and steers, shared with the modem thread.
#[derive(Debug, Default)]
pub struct SimState {
    /// Modem byte counters (sent, received).
    pub counters: (u64, u64),
    /// Whether application traffic and the clock move.
    pub traffic_on: bool,
    /// Set by the test: announce `+QIURC: "pdpdeact",1` at the next chance.
    pub pdp_deact_requested: bool,
    /// Counter answers given during the current boot, in order.
    pub answers: Vec<(u64, u64)>,
    /// Reports delivered during the current boot, in order.
    pub delivered: Vec<Delivered>,
    /// Index into `delivered` of the first report after the last `pdpdeact`.
    pub delivered_before_deact: Option<usize>,
    /// Simulated network time, Unix seconds.
    pub clock_unix: u64,
    /// Commands the modem did not know (should stay empty).
    pub unknown: Vec<String>,
    /// Set by the test: the next this many `AT+QMTPUB` fail (`+QMTPUB: …,2`) without reaching
    /// the broker, as when the radio link drops mid-publish.
    pub drop_publishes: u32,
    /// Set by the test: how long the modem holds each `+QMTPUB` result after the PUBACK (a
    /// slow network), in ms.
    pub publish_delay_ms: u64,
    /// Publishes that failed during the current boot, in order, with why.
    pub failed_publishes: Vec<PublishFailure>,
}

/// Why the simulated modem answered `+QMTPUB: …,2` to a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishFailure {
    /// The test asked for it (`SimState::drop_publishes`).
    Dropped,
    /// The firmware published without an MQTT session (`AT+QMTCONN`) on this boot.
    NoSession,
    /// The broker's PUBACK did not come within the modem's timeout.
    NoPubAck {
        /// How long the modem waited, in ms.
        waited_ms: u64,
    },
}

/// The modem and the QEMU process it talks to; QEMU is killed (power cut) on drop.
pub struct ModemSim {
    qemu: Child,
    thread: Option<std::thread::JoinHandle<()>>,
    /// State shared with the modem thread.
    pub state: Arc<Mutex<SimState>>,
    /// Where semihosting output (firmware log, panics) goes.
    pub semihosting_log: PathBuf,
}

impl ModemSim {
    /// Powers the board on: starts QEMU on `elf` in `workdir` and the modem on its UART.
    pub fn boot(
        elf: &Path,
        workdir: &Path,
        mqtt_port: u16,
        iccid20: &str,
        state: Arc<Mutex<SimState>>,
    ) -> Result<Self> {
        let semihosting_log = workdir.join("semihosting.log");
        let mut qemu = Command::new("qemu-system-arm")
            .args(["-cpu", "cortex-m4", "-machine", "mps2-an386", "-display", "none", "-monitor", "none"])
            .args(["-serial", "stdio"])
            .arg("-chardev")
            .arg(format!("file,id=semi,path={}", semihosting_log.display()))
            .args(["-semihosting-config", "enable=on,target=native,chardev=semi", "-kernel"])
            .arg(elf)
            .current_dir(workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(workdir.join("qemu.stderr"))?))
            .spawn()
            .context(
                "cannot start qemu-system-arm (apt-get install qemu-system-arm; tests/run.sh does it)",
            )?;
        let stdin = qemu.stdin.take().context("qemu stdin")?;
        let stdout = qemu.stdout.take().context("qemu stdout")?;
        {
            let mut s = state.lock().map_err(|_| anyhow::anyhow!("state poisoned"))?;
            s.answers.clear();
            s.delivered.clear();
            s.delivered_before_deact = None;
            s.failed_publishes.clear();
            s.pdp_deact_requested = false;
            s.traffic_on = true;
        }
        let st = state.clone();
        let iccid = iccid20.to_owned();
        let thread = std::thread::Builder::new().name("modem-sim".into()).spawn(move || {
            let mut modem = Modem {
                out: stdin,
                state: st,
                mqtt_port,
                iccid,
                mqtt: None,
                rng: rand::rngs::SmallRng::seed_from_u64(7),
            };
            if let Err(e) = modem.run(stdout) {
                eprintln!("modem simulator stopped: {e:#}");
            }
        })?;
        Ok(Self { qemu, thread: Some(thread), state, semihosting_log })
    }

    /// Waits until `cond` holds on the shared state, or fails with the firmware's log.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&SimState) -> bool) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = self.state.lock() {
                if cond(&s) {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; firmware log:\n{}",
                    std::fs::read_to_string(&self.semihosting_log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts power: SIGKILL to QEMU, no chance for the firmware to do anything.
    pub fn power_cut(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ModemSim {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Mqtt {
    client: rumqttc::Client,
    acks: mpsc::Receiver<()>,
}

struct Modem {
    out: ChildStdin,
    state: Arc<Mutex<SimState>>,
    mqtt_port: u16,
    iccid: String,
    mqtt: Option<Mqtt>,
    rng: rand::rngs::SmallRng,
}

impl Modem {
    fn send(&mut self, s: &str) -> Result<()> {
        self.out.write_all(s.as_bytes())?;
        self.out.flush()?;
        Ok(())
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, SimState>> {
        self.state.lock().map_err(|_| anyhow::anyhow!("state poisoned"))
    }

    fn run(&mut self, mut input: impl Read) -> Result<()> {
        // Power-on chatter, before the firmware asked anything.
        self.send("\r\nRDY\r\n\r\n+CPIN: READY\r\n")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if input.read(&mut byte)? == 0 {
                return Ok(()); // QEMU gone: power cut
            }
            match byte[0] {
                b'\r' => {
                    let cmd = String::from_utf8_lossy(&line).into_owned();
                    line.clear();
                    self.command(&cmd, &mut input)?;
                }
                b'\n' => {}
                b => {
                    if line.len() < COMMAND_BYTES_MAX {
                        line.push(b);
                    }
                }
            }
        }
    }

    fn command(&mut self, cmd: &str, input: &mut impl Read) -> Result<()> {
        let cmd = cmd.trim();
        if std::env::var_os("COUNTERSIGN_MODEM_TRACE").is_some() {
            eprintln!("modem <- {cmd:?}");
        }
        if cmd.is_empty() {
            return Ok(());
        }
        // Echo (ATE1, the power-on default), then any pending unsolicited line.
        let mut reply = format!("{cmd}\r");
        {
            let mut s = self.state()?;
            if s.pdp_deact_requested {
                s.pdp_deact_requested = false;
                s.traffic_on = false;
                s.delivered_before_deact = Some(s.delivered.len());
                reply.push_str("\r\n+QIURC: \"pdpdeact\",1\r\n");
            }
        }
        match cmd {
            "AT" => reply.push_str("\r\nOK\r\n"),
            "AT+QCCID" => reply.push_str(&format!("\r\n+QCCID: {}\r\n\r\nOK\r\n", self.iccid)),
            "AT+QGDCNT?" => {
                let (up, down) = (
                    self.rng.gen_range(0..SIM_TRAFFIC_STEP_BYTES_MAX),
                    self.rng.gen_range(0..SIM_TRAFFIC_STEP_BYTES_MAX),
                );
                let mut s = self.state()?;
                if s.traffic_on {
                    s.counters.0 += up;
                    s.counters.1 += down;
                }
                let c = s.counters;
                s.answers.push(c);
                reply.push_str(&format!("\r\n+QGDCNT: {},{}\r\n\r\nOK\r\n", c.0, c.1));
            }
            "AT+CCLK?" => {
                let mut s = self.state()?;
                if s.traffic_on {
                    s.clock_unix += SIM_CLOCK_STEP_S;
                }
                let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(s.clock_unix)?)?;
                reply.push_str(&format!(
                    "\r\n+CCLK: \"{:02}/{:02}/{:02},{:02}:{:02}:{:02}+00\"\r\n\r\nOK\r\n",
                    t.year() % 100,
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                ));
            }
            c if c.starts_with("AT+QMTOPEN=") => {
                self.send(&format!("{reply}\r\nOK\r\n"))?;
                let mut opts = rumqttc::MqttOptions::new("pending", "127.0.0.1", self.mqtt_port);
                opts.set_keep_alive(Duration::from_secs(30));
                // The TCP connection opens with the session (QMTCONN) in rumqttc; report it up.
                self.mqtt = None;
                return self.send("\r\n+QMTOPEN: 0,0\r\n");
            }
            c if c.starts_with("AT+QMTCONN=") => {
                let client_id = c.split('"').nth(1).unwrap_or("countersign-sim").to_owned();
                self.send(&format!("{reply}\r\nOK\r\n"))?;
                self.mqtt = Some(connect(&client_id, self.mqtt_port));
                return self.send("\r\n+QMTCONN: 0,0,0\r\n");
            }
            c if c.starts_with("AT+QMTPUB=") => return self.qmtpub(c, reply, input),
            other => {
                self.state()?.unknown.push(other.to_owned());
                reply.push_str("\r\nERROR\r\n");
            }
        }
        self.send(&reply)
    }

    fn qmtpub(&mut self, cmd: &str, mut reply: String, input: &mut impl Read) -> Result<()> {
        // AT+QMTPUB=<idx>,<msgID>,<qos>,<retain>,"<topic>",<len>
        let args = cmd.trim_start_matches("AT+QMTPUB=");
        let topic = args.split('"').nth(1).context("topic")?.to_owned();
        let mut head = args.split(',');
        let idx: u8 = head.next().context("idx")?.parse()?;
        let msg_id: u16 = head.next().context("msg id")?.parse()?;
        let len: usize = args.rsplit(',').next().context("len")?.parse()?;
        reply.push_str("\r\n> ");
        self.send(&reply)?;
        let mut payload = vec![0u8; len];
        input.read_exact(&mut payload)?;
        self.send("\r\nOK\r\n")?;
        let (drop, delay_ms) = {
            let mut s = self.state()?;
            let drop = s.drop_publishes > 0;
            s.drop_publishes = s.drop_publishes.saturating_sub(1);
            (drop, s.publish_delay_ms)
        };
        let failure = match &mut self.mqtt {
            _ if drop => Some(PublishFailure::Dropped),
            Some(m) => {
                let started = std::time::Instant::now();
                m.client.publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, payload.clone())?;
                match m.acks.recv_timeout(PUBACK_TIMEOUT) {
                    Ok(()) => None,
                    Err(_) => Some(PublishFailure::NoPubAck {
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    }),
                }
            }
            None => Some(PublishFailure::NoSession),
        };
        if delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
        if let Some(failure) = failure {
            if failure != PublishFailure::Dropped {
                eprintln!("modem simulator: publish {msg_id} failed: {failure:?}");
            }
            self.state()?.failed_publishes.push(failure);
            return self.send(&format!("\r\n+QMTPUB: {idx},{msg_id},2\r\n"));
        }
        {
            let mut s = self.state()?;
            // The modem counts its own MQTT traffic too.
            let air = report_air_bytes(len as u64, topic.len() as u64);
            s.counters.0 += air - 4 - 64;
            s.counters.1 += 4 + 64;
            let counters_before = s.answers.last().copied().unwrap_or_default();
            let report =
                Report::decode(&payload).map(|(r, _)| r).map_err(|e| anyhow::anyhow!("bad report: {e}"))?;
            let answers_at_delivery = s.answers.len();
            s.delivered.push(Delivered { report, counters_before, answers_at_delivery });
        }
        self.send(&format!("\r\n+QMTPUB: {idx},{msg_id},0\r\n"))
    }
}

fn connect(client_id: &str, port: u16) -> Mqtt {
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = rumqttc::Client::new(opts, 16);
    let (tx, acks) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    Mqtt { client, acks }
}
