//! The shell examples of the docs, as tests read them: the code blocks of a markdown section
//! ([`markdown_code`]), split into the commands a reader pastes and the answers the docs
//! promise for them ([`shell_steps`]), then run one after another in one `bash`
//! ([`run_shell_steps`]), the way a reader pastes them into one terminal.
//!
//! An answer is written under its command as `# → …` (continued on `#` lines); what a test can
//! check of it without guessing at ids and tokens is its JSON keys and the string values that
//! hold no `…` ([`Step::expected_fragments`]).

use anyhow::{bail, Context as _};
use std::{collections::BTreeMap, process::Stdio, time::Duration};
use tokio::io::AsyncWriteExt as _;

/// The code blocks of a markdown section (from its heading to the next heading of its level;
/// an empty heading: the whole text), concatenated.
pub fn markdown_code(text: &str, heading: &str) -> String {
    let mut code = String::new();
    let (mut in_section, mut in_block) = (heading.is_empty(), false);
    let level = heading.chars().take_while(|c| *c == '#').count();
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block && line.starts_with('#') {
            let this_level = line.chars().take_while(|c| *c == '#').count();
            if line.trim() == heading {
                in_section = true;
                continue;
            }
            if in_section && !heading.is_empty() && this_level <= level {
                in_section = false;
            }
        }
        if in_section && in_block {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// One command of a shell example and the answer written under it (empty: none promised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The command, continuation lines (`\` at the end) joined.
    pub command: String,
    /// The `# → …` lines under it, without the `# →` / `#`.
    pub expected: String,
}

/// Markers of an answer in a shell example: `# →` starts one, `#` lines continue it.
const ANSWER: &str = "# →";

/// The commands of a shell example with their promised answers. Blank lines and comment lines
/// that are not an answer are skipped; a trailing `# comment` stays part of its command (bash
/// ignores it).
pub fn shell_steps(code: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_answer = false;
    let mut pending = String::new();
    for line in code.lines() {
        let trimmed = line.trim();
        if !pending.is_empty() {
            pending.push('\n');
            pending.push_str(line);
            if !line.ends_with('\\') {
                steps.push(Step {
                    command: std::mem::take(&mut pending),
                    expected: String::new(),
                });
            }
            continue;
        }
        if let Some(answer) = trimmed.strip_prefix(ANSWER) {
            if let Some(step) = steps.last_mut() {
                step.expected.push_str(answer.trim());
                in_answer = true;
            }
            continue;
        }
        if trimmed.starts_with('#') {
            if in_answer {
                if let Some(step) = steps.last_mut() {
                    step.expected
                        .push_str(trimmed.trim_start_matches('#').trim());
                }
            }
            continue;
        }
        in_answer = false;
        if trimmed.is_empty() {
            continue;
        }
        if line.ends_with('\\') {
            pending.push_str(line);
        } else {
            steps.push(Step {
                command: line.to_string(),
                expected: String::new(),
            });
        }
    }
    if !pending.is_empty() {
        steps.push(Step {
            command: pending,
            expected: String::new(),
        });
    }
    steps
}

impl Step {
    /// What the output must contain: every `"key":` of the promised answer, and the whole
    /// `"key":"value"` where the value is literal (no `…`).
    pub fn expected_fragments(&self) -> Vec<String> {
        let mut found = Vec::new();
        let text = &self.expected;
        let mut rest = text.as_str();
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('"') else { break };
            let word = &after[..end];
            let tail = &after[end + 1..];
            if let Some(value_part) = tail.strip_prefix(':') {
                if let Some(value) = value_part.strip_prefix('"') {
                    if let Some(value_end) = value.find('"') {
                        let value = &value[..value_end];
                        if value.contains('…') {
                            found.push(format!("\"{word}\":"));
                        } else {
                            found.push(format!("\"{word}\":\"{value}\""));
                        }
                        rest = &value_part[1 + value_end + 1..];
                        continue;
                    }
                }
                found.push(format!("\"{word}\":"));
            }
            rest = tail;
        }
        found
    }
}

/// What one step printed and how it ended.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub step: Step,
    pub stdout: String,
    pub status: i32,
}

/// Runs `steps` in one `bash` (variables set by one step are seen by the next, as in a
/// terminal), after replacing every `from` of `replace` with its `to` in the commands (the
/// docs' fixed ports → a test's free ports). Each step's stdout and exit status come back; the
/// whole run has `deadline`.
pub async fn run_shell_steps(
    steps: &[Step],
    replace: &BTreeMap<String, String>,
    deadline: Duration,
) -> anyhow::Result<Vec<StepOutput>> {
    const MARK: &str = "@@cim-step-done@@";
    let mut script = String::new();
    for step in steps {
        let mut command = step.command.clone();
        for (from, to) in replace {
            command = command.replace(from, to);
        }
        // The status first, then a newline (the output of `curl -s` ends without one).
        script.push_str(&format!(
            "{command}\ncim_step_status=$?; echo; echo \"{MARK} $cim_step_status\"\n"
        ));
    }
    let mut child = tokio::process::Command::new("bash")
        .arg("--noprofile")
        .arg("--norc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning bash")?;
    let mut stdin = child.stdin.take().context("bash stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let output = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .context("the shell steps did not finish in time")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut outputs = Vec::new();
    let mut current = String::new();
    for line in stdout.lines() {
        if let Some(status) = line.strip_prefix(MARK) {
            let Some(step) = steps.get(outputs.len()) else {
                bail!("more step ends than steps in: {stdout}");
            };
            outputs.push(StepOutput {
                step: step.clone(),
                stdout: std::mem::take(&mut current).trim().to_string(),
                status: status.trim().parse().unwrap_or(-1),
            });
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if outputs.len() != steps.len() {
        bail!(
            "{} of {} steps ran; stderr: {}",
            outputs.len(),
            steps.len(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "## Try\n\n```sh\n./start.sh      # elsewhere\n\
        X=$(curl -s a) \\\n   -d b\n# → {\"user_id\":1,\"name\":\"alice\",\n#    \"token\":\"…\"}\n\
        echo hi # not an answer\n```\n\n## Next\n```sh\nnot this\n```\n";

    #[test]
    fn sections_commands_and_answers() {
        let code = markdown_code(EXAMPLE, "## Try");
        assert!(!code.contains("not this"));
        let steps = shell_steps(&code);
        assert_eq!(steps.len(), 3, "{steps:?}");
        assert_eq!(steps[1].command, "X=$(curl -s a) \\\n   -d b");
        assert_eq!(
            steps[1].expected_fragments(),
            ["\"user_id\":", "\"name\":\"alice\"", "\"token\":"]
        );
        assert_eq!(steps[2].command, "echo hi # not an answer");
        assert!(steps[2].expected.is_empty());
    }

    #[tokio::test]
    async fn steps_share_one_shell_and_report_each_status() -> anyhow::Result<()> {
        let steps = shell_steps("A=PORT\necho \"$A\"\nfalse\nprintf x\n");
        let replace = BTreeMap::from([("PORT".to_string(), "4242".to_string())]);
        let out = run_shell_steps(&steps, &replace, Duration::from_secs(20)).await?;
        let seen: Vec<_> = out.iter().map(|o| (o.stdout.as_str(), o.status)).collect();
        assert_eq!(seen, [("", 0), ("4242", 0), ("", 1), ("x", 0)]);
        Ok(())
    }
}
