"""Multi-turn editing (paper 6.5): each turn inpaints the previous turn's output; history and undo/redo.

    session = EditingSession(pipe, Image.open("room.jpg"))
    session.edit((40, 60, 200, 220), prompt="a red armchair")
    session.edit(sofa_mask, subject_image=Image.open("cushion.png"))
    session.undo()          # back to the armchair
    session.current.save("out.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Turn:
    """One edit: what went in and what came out.

    Attributes:
        source: the image this turn edited (the previous turn's output, or the initial image).
        mask: the mask as given (an image or a box).
        prompt: the text prompt, or None.
        subject: the subject image, or None.
        output: the inpainted image (the next turn's source).
        options: the other pipeline arguments of this turn (beta, steps, seed, ...); `beta` is the
            value the turn used, so a turn that left it to the mode's default records 1.0 or 0.3.
    """

    source: Image.Image
    mask: Any
    prompt: str | None
    subject: Any
    output: Image.Image
    options: dict = field(default_factory=dict)


class EditingSession:
    """A sequence of inpainting turns on one image; turn k's output is turn k+1's source.

    Args:
        pipe: a `LARGenPipeline` (or anything called like it that returns `.images`).
        image: the initial image.
        **defaults: pipeline arguments applied to every turn unless a turn overrides them. Leave
            `beta` out (or None) to give each turn its mode's default (`DEFAULT_BETA`: 1.0 for a
            subject without text, 0.3 with text), so one session can mix modes.
    """

    def __init__(self, pipe, image: Image.Image, **defaults) -> None:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        self.pipe = pipe
        self.initial = image.convert("RGB")
        self.defaults = defaults
        self.history: list[Turn] = []
        self._undone: list[Turn] = []

    @property
    def current(self) -> Image.Image:
        """The image the next turn will edit."""
        return self.history[-1].output if self.history else self.initial

    def edit(self, mask_image, prompt: str | None = None, subject_image=None, **options) -> Image.Image:
        """Run one turn on `current` and append it to the history (clears the redo stack).

        `options` override the session's defaults for this turn only; `beta=None` (or no beta at
        all) means the turn's mode default.

        Returns:
            The turn's output image.

        Raises:
            Whatever the pipeline raises for bad inputs; the history is unchanged then.
        """
        kwargs = {**self.defaults, **options}
        source = self.current
        result = self.pipe(source, mask_image, prompt=prompt, subject_image=subject_image, **kwargs)
        output = result.images[0]
        used_beta = getattr(result, "beta", None)
        if used_beta is not None:
            kwargs["beta"] = used_beta
        self.history.append(Turn(source, mask_image, prompt, subject_image, output, kwargs))
        self._undone.clear()
        return output

    def undo(self) -> Image.Image:
        """Drop the last turn; returns the restored current image.

        Raises:
            IndexError: there is nothing to undo.
        """
        if not self.history:
            raise IndexError("nothing to undo")
        self._undone.append(self.history.pop())
        return self.current

    def redo(self) -> Image.Image:
        """Re-apply the last undone turn (its stored output; nothing is recomputed).

        Raises:
            IndexError: there is nothing to redo.
        """
        if not self._undone:
            raise IndexError("nothing to redo")
        self.history.append(self._undone.pop())
        return self.current

    def __len__(self) -> int:
        return len(self.history)
