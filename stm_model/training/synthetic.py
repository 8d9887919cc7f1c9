"""Synthetic videos with ground-truth masks, deterministic from a seed.

Textured objects of several shapes (ellipses, polygons, stars, blobs) move over a textured,
slowly panning background: smooth Lissajous trajectories that can carry an object out of the
frame and back, rotation, scale changes, slow colour and brightness drift, and a depth order
that changes over time (objects occlude each other). Every quantity is a closed-form function
of the frame index, so any frame of an arbitrarily long video is rendered directly (streaming,
random access) and a video is identical on every machine for the same seed.

    video = SyntheticVideo(seed=3, height=128, width=128)
    image, labels = video.render(t)        # float32 (H, W, 3) in [0, 1], int64 (H, W) ids
    for image, labels in video.frames(1000):  ...
"""
import math

import numpy as np

SHAPES = ("ellipse", "polygon", "star", "blob")
PATTERNS = ("stripes", "checker", "dots", "rings")


def _hsv_to_rgb(hue, saturation, value):
    """Vectorised HSV -> RGB, hue in [0, 1)."""
    hue = np.asarray(hue, dtype=np.float64) % 1.0
    i = np.floor(hue * 6)
    f = hue * 6 - i
    p = value * (1 - saturation)
    q = value * (1 - f * saturation)
    t = value * (1 - (1 - f) * saturation)
    i = i.astype(int) % 6
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
             (value, p, q)]
    return np.stack([np.choose(i, [row[c] for row in table]) for c in range(3)], axis=-1)


class _Background:
    """Sum of coloured oriented gratings plus a smooth noise field, panning slowly."""

    def __init__(self, rng, height, width):
        self.gratings = []
        for _ in range(rng.integers(2, 5)):
            angle = rng.uniform(0, math.pi)
            frequency = rng.uniform(0.02, 0.12)
            colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.6), 1.0)
            colour = colour * rng.uniform(0.08, 0.22)
            self.gratings.append((math.cos(angle) * frequency, math.sin(angle) * frequency,
                                  rng.uniform(0, 2 * math.pi), colour))
        self.base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 0.7))
        self.noise = rng.uniform(-0.12, 0.12, size=(height // 8 + 3, width // 8 + 3, 3))
        self.pan = rng.uniform(-0.4, 0.4, size=2)  # pixels per frame
        self.height, self.width = height, width

    def render(self, t, ys, xs):
        dy, dx = self.pan * t
        image = np.broadcast_to(self.base, ys.shape + (3,)).copy()
        for fx, fy, phase, colour in self.gratings:
            wave = np.sin(2 * math.pi * (fx * (xs + dx) + fy * (ys + dy)) + phase)
            image += wave[..., None] * colour
        # bilinear upsampling of the coarse noise, shifted with the pan (wrapping)
        gy = ((ys + dy) / 8.0) % (self.noise.shape[0] - 1)
        gx = ((xs + dx) / 8.0) % (self.noise.shape[1] - 1)
        y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
        wy, wx = (gy - y0)[..., None], (gx - x0)[..., None]
        n = self.noise
        image += ((1 - wy) * (1 - wx) * n[y0, x0] + (1 - wy) * wx * n[y0, x0 + 1]
                  + wy * (1 - wx) * n[y0 + 1, x0] + wy * wx * n[y0 + 1, x0 + 1])
        return image


class _Object:
    """One textured object: shape, texture, trajectory, rotation, scale, depth, colour drift."""

    def __init__(self, rng, height, width, leaves, start):
        self.shape = SHAPES[rng.integers(len(SHAPES))]
        self.pattern = PATTERNS[rng.integers(len(PATTERNS))]
        size = min(height, width)
        self.radius = rng.uniform(0.1, 0.19) * size
        self.aspect = rng.uniform(0.55, 1.0)
        self.sides = int(rng.integers(3, 7))
        self.harmonics = [(k, rng.uniform(0, 0.25 / k), rng.uniform(0, 2 * math.pi))
                          for k in range(2, 6)]
        self.hue = rng.uniform()
        self.hue_drift = rng.uniform(-0.0015, 0.0015)
        self.colours = (_hsv_to_rgb(self.hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)),
                        _hsv_to_rgb(self.hue + rng.uniform(0.3, 0.7), rng.uniform(0.3, 1.0),
                                    rng.uniform(0.2, 0.9)))
        self.texture_frequency = rng.uniform(0.06, 0.16) * 2 * math.pi
        self.texture_angle = rng.uniform(0, math.pi)
        # trajectory: centre + two sinusoids per axis; amplitudes reach past the border when
        # the object leaves and re-enters the frame
        reach = 0.6 if leaves else 0.25  # summed amplitude of the two sinusoids, per axis
        self.centre = np.array([start[0] * height, start[1] * width])
        self.amplitudes = rng.uniform(0.04, reach / 2, size=(2, 2)) * np.array([[height], [width]])
        self.frequencies = rng.uniform(0.004, 0.03, size=(2, 2)) * 2 * math.pi
        self.phases = rng.uniform(0, 2 * math.pi, size=(2, 2))
        # start inside the frame: shift the phases so that t = 0 is near the centre path
        self.phases[:, 0] = rng.choice([0.0, math.pi], size=2)
        self.phases[:, 1] = rng.choice([0.0, math.pi], size=2)
        self.angle, self.spin = rng.uniform(0, 2 * math.pi), rng.uniform(-0.03, 0.03)
        self.scale_amplitude = rng.uniform(0.0, 0.3)
        self.scale_frequency = rng.uniform(0.005, 0.03) * 2 * math.pi
        self.scale_phase = rng.uniform(0, 2 * math.pi)
        self.depth, self.depth_frequency = rng.uniform(), rng.uniform(0.002, 0.02) * 2 * math.pi
        self.depth_phase = rng.uniform(0, 2 * math.pi)

    def state(self, t):
        waves = self.amplitudes * np.sin(self.frequencies * t + self.phases)
        centre = self.centre + waves.sum(axis=1)
        scale = 1 + self.scale_amplitude * math.sin(self.scale_frequency * t + self.scale_phase)
        depth = self.depth + math.sin(self.depth_frequency * t + self.depth_phase)
        return centre, self.angle + self.spin * t, scale, depth

    def render(self, t, ys, xs):
        """(coverage bool (H, W), colour (H, W, 3)) at frame t."""
        (cy, cx), angle, scale, _ = self.state(t)
        dy, dx = ys - cy, xs - cx
        cos, sin = math.cos(angle), math.sin(angle)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # object-local coordinates
        radius = self.radius * scale
        theta = np.arctan2(v, u)
        if self.shape == "ellipse":
            limit = radius / np.sqrt(np.cos(theta) ** 2 + (np.sin(theta) / self.aspect) ** 2)
        elif self.shape == "polygon":
            sector = 2 * math.pi / self.sides
            limit = radius * math.cos(sector / 2) / np.cos((theta % sector) - sector / 2)
        elif self.shape == "star":
            limit = radius * (0.72 + 0.28 * np.cos(self.sides * theta))
        else:
            limit = radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in self.harmonics))
        coverage = np.hypot(u, v) <= limit
        # texture in object-local coordinates, so it moves, turns and scales with the object
        su, sv = u / scale, v / scale
        ca, sa = math.cos(self.texture_angle), math.sin(self.texture_angle)
        f = self.texture_frequency
        if self.pattern == "stripes":
            mix = 0.5 + 0.5 * np.sin(f * (ca * su + sa * sv))
        elif self.pattern == "checker":
            mix = ((np.floor(f * su / math.pi) + np.floor(f * sv / math.pi)) % 2).astype(float)
        elif self.pattern == "dots":
            mix = ((np.sin(f * su) * np.sin(f * sv)) > 0.3).astype(float)
        else:
            mix = 0.5 + 0.5 * np.sin(f * np.hypot(su, sv))
        drift = self.hue_drift * t
        first = _hsv_to_rgb(self.hue + drift, 0.85, 0.9) * 0.5 + self.colours[0] * 0.5
        second = self.colours[1]
        brightness = 1 + 0.15 * math.sin(0.02 * t + self.depth_phase)
        colour = (mix[..., None] * first + (1 - mix[..., None]) * second) * brightness
        return coverage, colour


class SyntheticVideo:
    """A synthetic video (see the module docstring); num_objects defaults to 2 or 3."""

    def __init__(self, seed, height=128, width=128, num_objects=None, noise=0.02):
        rng = np.random.default_rng(seed)
        self.seed, self.height, self.width = seed, height, width
        self.num_objects = int(num_objects or rng.integers(2, 4))
        self.background = _Background(rng, height, width)
        leaving = rng.random(self.num_objects) < 0.5
        # starting points spread around the centre, so every object is visible on frame 0
        offset = rng.uniform(0, 2 * math.pi)
        angles = offset + 2 * math.pi * np.arange(self.num_objects) / self.num_objects
        starts = [(0.5 + 0.26 * math.sin(a), 0.5 + 0.26 * math.cos(a)) for a in angles]
        self.objects = [_Object(rng, height, width, leaves, start)
                        for leaves, start in zip(leaving, starts, strict=True)]
        self.noise = noise
        self._ys, self._xs = np.mgrid[0:height, 0:width].astype(np.float64)

    def render(self, t):
        """(image float32 (H, W, 3) in [0, 1], labels int64 (H, W)) of frame t; labels hold the
        id (1..num_objects) of the front-most object at each pixel, 0 elsewhere."""
        ys, xs = self._ys, self._xs
        image = self.background.render(t, ys, xs)
        labels = np.zeros((self.height, self.width), dtype=np.int64)
        order = sorted(range(self.num_objects), key=lambda i: -self.objects[i].state(t)[3])
        for index in order:  # back to front
            coverage, colour = self.objects[index].render(t, ys, xs)
            image[coverage] = colour[coverage]
            labels[coverage] = index + 1
        if self.noise:
            noise = np.random.default_rng((self.seed, t)).normal(0, self.noise, image.shape)
            image = image + noise
        return np.clip(image, 0, 1).astype(np.float32), labels

    def frames(self, count, start=0, step=1):
        """Yield (image, labels) for frames start, start + step, ... (count of them)."""
        for index in range(count):
            yield self.render(start + index * step)
