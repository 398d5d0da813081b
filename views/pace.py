"""The Review page's estimate of the time left at the team's pace, in one sentence."""

from db.reviews import decisions_frame
from engine.loop.agreement import PACE_DECISIONS, time_left


def _duration(seconds: float) -> str:
    """'About 25 min', 'About 2 h 10 min', 'About 3 h', or 'Under a minute'."""
    hours, minutes = divmod(round(seconds / 60), 60)
    parts = ([f"{hours} h"] if hours else []) + ([f"{minutes} min"] if minutes else [])
    return "About " + " ".join(parts) if parts else "Under a minute"


def time_left_text(db_url: str, remaining: int) -> str | None:
    """'About 2 h 10 min left at the team's pace (median 14 s per image, 2 reviewers)' for
    `remaining` decisions still to make (a double-read candidate needs two); None when none
    remain or no decision has its seconds yet, so there is nothing to estimate."""
    if remaining <= 0:
        return None
    pace = time_left(decisions_frame(db_url, last=PACE_DECISIONS), remaining)
    if pace is None:
        return None
    team = f"{pace.reviewers} reviewer{'s' if pace.reviewers > 1 else ''}"
    return (
        f"{_duration(pace.seconds_left)} left at the team's pace (median "
        f"{pace.median_seconds:.0f} s per image, {team})."
    )
