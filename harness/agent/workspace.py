"""The agent's own worktree and branch: candidates are commits on it, the user's checkout is
never written. The last kept commit survives restarts (runs/agent-<tag>/kept)."""

from __future__ import annotations

from pathlib import Path

from harness.git import GitError, git

# the agent's commits are records of candidates: the user's hooks and signing do not apply to them
NO_HOOKS = ["-c", "core.hooksPath=/dev/null"]
COMMITTER = [*NO_HOOKS, "-c", "commit.gpgsign=false", "-c", "user.name=autoresearch",
             "-c", "user.email=autoresearch@localhost"]  # fmt: skip


class Workspace:
    """The worktree at root/worktree on `branch`, at the last kept commit once made."""

    def __init__(self, repo: Path, train_rel: Path, root: Path, branch: str):
        self.repo, self.branch, self.path = repo, branch, root / "worktree"
        self.train_py = self.path / train_rel
        self.created = False  # the branch is new this session
        if not (self.path / ".git").exists():
            git(["worktree", "prune"], repo)
            if git(["branch", "--list", branch], repo):
                git([*NO_HOOKS, "worktree", "add", str(self.path), branch], repo)
            else:
                git([*NO_HOOKS, "worktree", "add", "-b", branch, str(self.path), "HEAD"], repo)
                self.created = True
        # HEAD may be a candidate an interrupted session left: the kept commit is recorded apart
        self.kept_file = root / "kept"
        recorded = self.kept_file.read_text().strip() if self.kept_file.exists() else ""
        self.keep(recorded if recorded and self._is_ancestor(recorded) else "HEAD")
        self.reset()

    def _is_ancestor(self, commit: str) -> bool:
        try:
            git(["merge-base", "--is-ancestor", commit, "HEAD"], self.path)
        except GitError:
            return False
        return True

    def commit(self, message: str, train_py: str | None = None) -> str:
        """Commit train.py (written first when given) -> the short commit."""
        if train_py is not None:
            self.train_py.write_text(train_py)
        git(["add", "--", str(self.train_py)], self.path)
        git([*COMMITTER, "commit", "-q", "-m", message], self.path)
        return self.short()

    def short(self) -> str:
        return git(["rev-parse", "--short=7", "HEAD"], self.path)

    def keep(self, commit: str = "HEAD") -> None:
        self.kept = git(["rev-parse", "--verify", f"{commit}^{{commit}}"], self.path)
        self.kept_file.write_text(self.kept + "\n")

    def reset(self) -> None:
        git(["reset", "-q", "--hard", self.kept], self.path)
        git(["clean", "-q", "-fd"], self.path)

    def clean(self) -> bool:
        status = git(["status", "--porcelain", "--untracked-files=all"], self.path)
        return status == "" and self.head() == self.kept

    def head(self) -> str:
        return git(["rev-parse", "HEAD"], self.path)


def start_point(workspace: Workspace, script: Path, train_rel: Path, uncommitted: bool,
                from_checkout: bool, log) -> None:  # fmt: skip
    """A new branch starts from the checkout's uncommitted train.py with --from-checkout;
    otherwise uncommitted changes there are not on the branch, and the user is told so."""
    if uncommitted and from_checkout and workspace.created:
        workspace.train_py.write_bytes(script.read_bytes())
        workspace.keep(
            workspace.commit(f"{train_rel} as in the checkout, uncommitted changes included")
        )
        log("from_checkout", commit=workspace.kept[:7], train_py=str(script))
    elif uncommitted and from_checkout:
        log("warning", reason=f"--from-checkout: branch {workspace.branch} exists, so it continues "
                              f"from its kept commit {workspace.kept[:7]} without your uncommitted "
                              f"changes to {train_rel}; a new --tag starts from them")  # fmt: skip
    elif uncommitted:
        how = "starts" if workspace.created else "continues"
        log("warning", reason=f"{train_rel} in your checkout has uncommitted changes that branch "
                              f"{workspace.branch} does not have: it {how} from commit "
                              f"{workspace.kept[:7]}. Commit them, or start a new --tag with "
                              "--from-checkout")  # fmt: skip
