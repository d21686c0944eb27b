"""`python -m harness agent`: propose a change, run it in tmux, keep it or reset, for hours.

    runs/agent-<tag>/worktree/     git worktree on branch autoresearch/<tag>: the only tree touched
    runs/agent-<tag>/agent.jsonl   every event: proposals, rejections with reasons, runs, decisions
    runs/agent-<tag>/agent.log     the same as lines to read (the tmux window "agent" follows it)
    runs/agent-<tag>/jobs/<n>/     the tmux job: job.sh, console.log, exit_code
    runs/agent-<tag>/optuna.journal  the Optuna study (resumed when the agent restarts)
    runs/agent-<tag>/w<k>/         with --workers N: worker k's worktree (branch
                                   autoresearch/<tag>-<k>), logs and jobs; the study is shared

Each candidate train.py is a commit on the branch; a kept run leaves it there, anything else
(discard, crash, invalid, a rejected reply, a proposal that could not be applied) resets the
branch to the last kept commit. Optuna's candidates are flags for the kept train.py, so they add
no commit: their flags are in the row's config column and in the study. The runs themselves are
ordinary harness runs: rows in results.tsv, folders in runs/.

Ctrl-C, SIGTERM and SIGHUP stop the running experiment with the same signal (its runner writes
the row; the agent writes one itself if the runner died first), return the branch to the kept
commit and exit with 128 + the signal's number (130, 143, 129). A session killed outright leaves
its last job behind: the next session started with the same tag stops it if it still runs and
adopts its row, or records it as "interrupted (agent killed)".

The API key lives only in this process: the agent's environment is emptied of every
secret-looking variable while it runs, so neither git, tmux, the tmux server it starts, a pane,
nor a run inherits one, and the logs mask it.

    cli.py        flags and main: checks, the proposer, the workspace, the tmux session
    loop.py       propose -> run -> keep or reset, --max-crashes, signals, reconciliation
    workspace.py  the worktree and branch, the kept commit, reset, --from-checkout
    jobs.py       one candidate as a tmux job (job.sh, console.log, exit code) -> its row
    log.py        agent.jsonl and agent.log, secrets masked
    proposers.py  the LLM and Optuna proposers
    edits.py      SEARCH/REPLACE blocks from a model's reply, applied exactly or refused
    tmux.py       the tmux session, its viewer windows and jobs
    workers.py    --workers N: each worker's folder, branch, cores or device; their supervisor
"""
