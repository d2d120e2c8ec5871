//! `cim-client`: the terminal chat client. Everything lives in [`cim_client::terminal`];
//! this file only hands over to it.

fn main() -> std::process::ExitCode {
    cim_client::terminal::main()
}
