//! Terminal input and output, on two threads of their own.
//!
//! - The **input thread** runs rustyline's blocking `readline` (line editing, the up-arrow
//!   history kept in `input_history.txt`) and hands each line to the app loop over a bounded
//!   channel. It stops by itself after `:q!`, end of input (Ctrl-D, end of a pipe) or Ctrl-C,
//!   so that the terminal is back in its normal mode when the client exits.
//! - The **output thread** prints what the app loop sends it. On a terminal it goes through
//!   rustyline's `ExternalPrinter`, which clears the prompt and the half-typed line, prints
//!   the text and draws them again: incoming messages never garble what the user is typing.
//!   When stdin or stdout is not a terminal (scripts) lines are written to stdout as they come.
//!
//! Why threads and not tasks: `readline` blocks, and the printer may block on the terminal;
//! neither may stall the async loop that reads the connection.

use super::command::{self, Input};
use rustyline::{
    config::Config, error::ReadlineError, history::FileHistory, DefaultEditor, ExternalPrinter,
};
use std::{
    io::{self, Write},
    path::PathBuf,
    thread,
};
use tokio::sync::mpsc;

/// Lines typed ahead of the app loop. Small: a human types slower than the loop reads.
const INPUT_CAPACITY: usize = 64;
/// Lines waiting to be printed. Printing is fast; the bound only matters when the terminal
/// stalls (scrolled back, suspended), and then the app loop waits instead of piling up text.
const OUTPUT_CAPACITY: usize = 1024;
/// Entries of the up-arrow history.
const INPUT_HISTORY_SIZE: usize = 1000;

/// What the input thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputEvent {
    Line(String),
    /// Ctrl-D on an empty line, or the end of piped input.
    Eof,
    /// Ctrl-C.
    Interrupted,
    /// The terminal failed; the thread stopped.
    Failed(String),
}

/// One piece of output.
enum Line {
    /// Printed above the prompt (through rustyline's external printer on a terminal).
    Normal(String),
    /// The session is over and the process will exit soon: written straight to stdout, as is
    /// everything after it. rustyline's external printer only queues text for the editor
    /// thread, which may never get to render it before the process exits.
    Final(String),
}

/// Sends text to the output thread; cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Line>,
}

impl Output {
    /// Prints `text` (one or more lines; a final newline is added).
    pub async fn print(&self, text: impl Into<String>) {
        // Fails only once the output thread ended, which happens after the last sender is
        // gone: nothing to print to then.
        let _ = self.tx.send(Line::Normal(text.into())).await;
    }

    /// Prints `text` as one of the last lines before exiting (see `Line::Final`).
    pub async fn print_final(&self, text: impl Into<String>) {
        let _ = self.tx.send(Line::Final(text.into())).await;
    }
}

/// The running input and output threads.
pub struct Terminal {
    /// Typed lines, in order; closed once the input thread stopped.
    pub lines: mpsc::Receiver<InputEvent>,
    pub output: Output,
    printer: thread::JoinHandle<()>,
    /// Whether line editing (raw mode) is in use, i.e. stdin is a terminal.
    pub interactive: bool,
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
}

impl Terminal {
    /// Starts both threads. `input_history`: where the typed lines are kept (none: not kept).
    pub fn start(prompt: String, input_history: Option<PathBuf>) -> io::Result<Terminal> {
        let config = Config::builder()
            .max_history_size(INPUT_HISTORY_SIZE)
            .map_err(io::Error::other)?
            .history_ignore_dups(true)
            .map_err(io::Error::other)?
            .history_ignore_space(true)
            .auto_add_history(true)
            .build();
        let mut editor = DefaultEditor::with_config(config).map_err(io::Error::other)?;
        if let Some(path) = &input_history {
            // A missing or unreadable file just means an empty up-arrow history.
            let _ = editor.load_history(path);
        }
        // Fails when stdin or stdout is not a terminal: then there is no prompt to protect.
        let printer = editor.create_external_printer().ok();
        let interactive = printer.is_some();
        #[cfg(unix)]
        let saved = interactive
            .then(|| nix::sys::termios::tcgetattr(io::stdin()).ok())
            .flatten();

        let (lines_tx, lines) = mpsc::channel(INPUT_CAPACITY);
        thread::Builder::new()
            .name("cim-input".into())
            .spawn(move || read_lines(editor, &prompt, input_history, lines_tx))?;

        let (out_tx, out_rx) = mpsc::channel::<Line>(OUTPUT_CAPACITY);
        let printer = thread::Builder::new()
            .name("cim-output".into())
            .spawn(move || print_lines(printer, out_rx))?;
        Ok(Terminal {
            lines,
            output: Output { tx: out_tx },
            printer,
            interactive,
            #[cfg(unix)]
            saved,
        })
    }

    /// Waits until everything sent to the output was printed. `output` handles still alive
    /// elsewhere keep the output thread running, so drop them first.
    pub fn finish(self, input_stopped: bool) {
        let Terminal {
            output,
            printer,
            #[cfg(unix)]
            saved,
            ..
        } = self;
        drop(output);
        let _ = printer.join();
        if !input_stopped {
            // The input thread is still inside `readline`, with the terminal in raw mode, and
            // the process is about to exit under it: put the terminal back as we found it.
            #[cfg(unix)]
            if let Some(saved) = saved {
                let _ = nix::sys::termios::tcsetattr(
                    io::stdin(),
                    nix::sys::termios::SetArg::TCSANOW,
                    &saved,
                );
                // Also end bracketed-paste mode, which rustyline turned on, and leave the
                // half-drawn prompt line.
                let mut out = io::stdout();
                let _ = out.write_all(b"\x1b[?2004l\r\n");
                let _ = out.flush();
            }
        }
    }
}

fn read_lines(
    mut editor: rustyline::Editor<(), FileHistory>,
    prompt: &str,
    input_history: Option<PathBuf>,
    tx: mpsc::Sender<InputEvent>,
) {
    loop {
        let event = match editor.readline(prompt) {
            Ok(line) => {
                if let Some(path) = &input_history {
                    // Appended after every line so a crash loses nothing; failures only cost
                    // the up-arrow history.
                    let _ = editor.append_history(path);
                }
                InputEvent::Line(line)
            }
            Err(ReadlineError::Eof) => InputEvent::Eof,
            Err(ReadlineError::Interrupted) => InputEvent::Interrupted,
            Err(e) => InputEvent::Failed(e.to_string()),
        };
        // Stop reading after the last line the app will act on, so the terminal leaves raw
        // mode before the process exits.
        let last = match &event {
            InputEvent::Line(line) => command::parse(line) == Input::Quit,
            _ => true,
        };
        if tx.blocking_send(event).is_err() || last {
            return;
        }
    }
}

fn print_lines(mut printer: Option<impl ExternalPrinter>, mut rx: mpsc::Receiver<Line>) {
    let mut stdout = io::stdout();
    while let Some(line) = rx.blocking_recv() {
        let mut text = match line {
            Line::Normal(text) => text,
            Line::Final(text) => {
                if printer.take().is_some() {
                    // Leave the prompt line rustyline drew.
                    let _ = stdout.write_all(b"\r\n");
                }
                text
            }
        };
        text.push('\n');
        let printed = match printer.as_mut() {
            Some(p) => p.print(text.clone()).is_ok(),
            None => false,
        };
        if !printed {
            // Not a terminal, or the external printer failed: plain stdout still works.
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    }
}
