"""Evaluation video sources: each layout loads right, bad input says why."""

import io
import json
import os
import pickle
import shutil
import zipfile

import av
import imageio.v3 as iio
import numpy as np
from PIL import Image
import pytest

from data_prep import masks
from data_prep import video_sources

H, W = 24, 40
NAMES = ("bear", "car", "dog")


def _frame(t, v=0):
  """A smooth frame with a block that moves with t (lossy codecs keep it)."""
  y, x = np.mgrid[0:H, 0:W]
  frame = np.stack(
      [x * 5 + 20 * v, y * 8, np.full((H, W), 100 + 10 * t)], -1
  ).astype(np.uint8)
  frame[4 + t : 12 + t, 5 + 3 * t : 15 + 3 * t] = (250, 30, 30)
  return frame


def _ids(t, v=0):
  """Object 1 follows the block, object 2 is fixed, row 0 is void."""
  ids = np.zeros((H, W), np.uint8)
  ids[4 + t : 12 + t, 5 + 3 * t : 15 + 3 * t] = 1
  ids[15:20, 20 : 30 + v] = 2
  ids[0, :] = 255
  return ids


def _davis(root, names=NAMES, num_frames=4):
  """A DAVIS-2017 folder; train and val both list every video."""
  os.makedirs(os.path.join(root, "ImageSets", "2017"))
  for split in ("train", "val"):
    with open(
        os.path.join(root, "ImageSets", "2017", f"{split}.txt"), "w"
    ) as f:
      f.write("\n".join(names) + "\n")
  for v, name in enumerate(names):
    frames_dir = os.path.join(root, "JPEGImages", "480p", name)
    masks_dir = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(frames_dir)
    os.makedirs(masks_dir)
    for t in range(num_frames):
      iio.imwrite(os.path.join(frames_dir, f"{t:05d}.jpg"), _frame(t, v))
      video_sources.write_palette_mask(
          os.path.join(masks_dir, f"{t:05d}.png"), _ids(t, v)
      )
  return root


def _eval_data(test_config, source, path, **fields):
  eval_data = test_config.eval_data
  eval_data.source = source
  eval_data.path = str(path)
  eval_data.split = "val"
  for key, value in fields.items():
    eval_data[key] = value
  return eval_data


def _load_all(eval_data):
  return {
      ref.name: video_sources.load_video(ref, eval_data)
      for ref in video_sources.list_videos(eval_data)
  }


def test_davis_folder(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"))
  eval_data = _eval_data(test_config, "davis", root)
  refs = video_sources.list_videos(eval_data)
  assert [r.name for r in refs] == list(NAMES)
  # Worker processes receive the refs pickled.
  assert pickle.loads(pickle.dumps(refs)) == refs
  videos = {r.name: video_sources.load_video(r, eval_data) for r in refs}
  car = videos["car"]
  assert car.frame_names == ["00000", "00001", "00002", "00003"]
  assert car.frames.shape == (4, H, W, 3) and car.frames.dtype == np.uint8
  for t in range(4):
    path = os.path.join(root, "JPEGImages", "480p", "car", f"{t:05d}.jpg")
    np.testing.assert_array_equal(car.frames[t], iio.imread(path))
    with open(path, "rb") as f:
      assert car.frame_bytes[t] == f.read()
    np.testing.assert_array_equal(car.labels[t], _ids(t, 1))
  assert (car.labels[:, 0] == 255).all()  # Void is kept.
  np.testing.assert_array_equal(car.has_label, [True] * 4)
  assert car.num_objects == 2
  np.testing.assert_array_equal(car.object_first_frame, [0, 0])
  assert car.object_first_frame.dtype == np.int32
  assert car.original_size == (H, W)


def test_davis_test_dev_has_only_the_first_annotation(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"), names=("bear",))
  for t in (1, 2, 3):
    os.remove(os.path.join(root, "Annotations", "480p", "bear", f"{t:05d}.png"))
  video = _load_all(_eval_data(test_config, "davis", root))["bear"]
  np.testing.assert_array_equal(video.has_label, [True, False, False, False])
  np.testing.assert_array_equal(video.labels[0], _ids(0))
  assert not video.labels[1:].any()
  assert video.num_objects == 2


def test_davis_full_resolution_folder(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"), names=("bear",))
  for kind in ("JPEGImages", "Annotations"):
    os.rename(
        os.path.join(root, kind, "480p"),
        os.path.join(root, kind, "Full-Resolution"),
    )
  eval_data = _eval_data(test_config, "davis", root)
  with pytest.raises(video_sources.InputError, match="480p: folder is missing"):
    video_sources.list_videos(eval_data)
  eval_data.resolution = "full_resolution"
  video = _load_all(eval_data)["bear"]
  np.testing.assert_array_equal(video.labels[3], _ids(3))


def test_davis_largest_first_frame_id_counts_objects(tmp_path, test_config):
  # SPEC 9: ids 1..K with K the largest id of frame 0; absent ids are empty.
  root = _davis(str(tmp_path / "DAVIS"), names=("bear",))
  masks_dir = os.path.join(root, "Annotations", "480p", "bear")
  for t in range(4):
    ids = _ids(t)
    ids[ids == 2] = 3
    video_sources.write_palette_mask(
        os.path.join(masks_dir, f"{t:05d}.png"), ids
    )
  video = _load_all(_eval_data(test_config, "davis", root))["bear"]
  assert video.num_objects == 3
  np.testing.assert_array_equal(video.object_first_frame, [0, 0, 0])


def test_davis2016_binary_masks_are_one_object(tmp_path, test_config):
  root = str(tmp_path / "DAVIS")
  _davis(root)
  os.makedirs(os.path.join(root, "ImageSets", "2016"))
  with open(os.path.join(root, "ImageSets", "2016", "val.txt"), "w") as f:
    f.write("dog\n")
  # DAVIS-2016 masks: greyscale 0/255 with 255 = the object.
  for t in range(4):
    binary = np.where(_ids(t, 2) == 1, 255, 0).astype(np.uint8)
    iio.imwrite(
        os.path.join(root, "Annotations", "480p", "dog", f"{t:05d}.png"), binary
    )
  videos = _load_all(_eval_data(test_config, "davis2016", root))
  assert list(videos) == ["dog"]
  dog = videos["dog"]
  assert dog.num_objects == 1
  for t in range(4):
    np.testing.assert_array_equal(dog.labels[t], _ids(t, 2) == 1)


def test_davis2016_merges_objects_and_keeps_void(tmp_path, test_config):
  # No 2016 split file: the 2017 list is used; objects merge into id 1.
  root = _davis(str(tmp_path / "DAVIS"), names=("bear",))
  video = _load_all(_eval_data(test_config, "davis2016", root))["bear"]
  assert video.num_objects == 1
  expected = _ids(2)
  expected[(expected == 1) | (expected == 2)] = 1
  np.testing.assert_array_equal(video.labels[2], expected)


def _youtube_vos(root, with_meta):
  """valid/: frames every 5th, object 2 first annotated at frame 00010."""
  split_dir = os.path.join(root, "valid")
  frames_dir = os.path.join(split_dir, "JPEGImages", "fish")
  masks_dir = os.path.join(split_dir, "Annotations", "fish")
  os.makedirs(frames_dir)
  os.makedirs(masks_dir)
  for t in range(4):
    iio.imwrite(os.path.join(frames_dir, f"{5 * t:05d}.jpg"), _frame(t))
  first = np.zeros((H, W), np.uint8)
  first[2:8, 2:8] = 1
  later = np.zeros((H, W), np.uint8)
  later[10:20, 20:30] = 2
  video_sources.write_palette_mask(os.path.join(masks_dir, "00000.png"), first)
  video_sources.write_palette_mask(os.path.join(masks_dir, "00010.png"), later)
  if with_meta:
    meta = {"videos": {"fish": {"objects": {"1": {}, "2": {}}}}}
    with open(os.path.join(split_dir, "meta.json"), "w") as f:
      json.dump(meta, f)
  return root, first, later


@pytest.mark.parametrize("with_meta", [False, True])
def test_youtube_vos_objects_appear_later(tmp_path, test_config, with_meta):
  root, first, later = _youtube_vos(str(tmp_path / "ytvos"), with_meta)
  eval_data = _eval_data(test_config, "youtube_vos", root, split="valid")
  videos = _load_all(eval_data)
  assert list(videos) == ["fish"]
  fish = videos["fish"]
  assert fish.frame_names == ["00000", "00005", "00010", "00015"]
  np.testing.assert_array_equal(fish.has_label, [True, False, True, False])
  assert fish.num_objects == 2
  np.testing.assert_array_equal(fish.object_first_frame, [0, 2])
  np.testing.assert_array_equal(fish.labels[0], first)
  np.testing.assert_array_equal(fish.labels[2], later)
  assert not fish.labels[1].any() and not fish.labels[3].any()
  frame = iio.imread(
      os.path.join(root, "valid", "JPEGImages", "fish", "00010.jpg")
  )
  np.testing.assert_array_equal(fish.frames[2], frame)


def _zip_davis(src_parent, zip_path):
  """Zips <src_parent>/DAVIS as the official archive is laid out."""
  with zipfile.ZipFile(zip_path, "w") as archive:
    for folder, _, files in os.walk(os.path.join(src_parent, "DAVIS")):
      for name in sorted(files):
        path = os.path.join(folder, name)
        archive.write(path, os.path.relpath(path, src_parent))


@pytest.mark.parametrize(
    "resolution, folder, archive",
    [
        ("480p", "480p", "DAVIS-2017-trainval-480p.zip"),
        (
            "full_resolution",
            "Full-Resolution",
            "DAVIS-2017-trainval-Full-Resolution.zip",
        ),
    ],
)
def test_tfds_davis_builds_offline_and_loads(
    tmp_path, test_config, resolution, folder, archive
):
  src = tmp_path / "src"
  root = _davis(str(src / "DAVIS"))
  for kind in ("JPEGImages", "Annotations"):
    os.rename(
        os.path.join(root, kind, "480p"), os.path.join(root, kind, folder)
    )
  archives = tmp_path / "archives"
  archives.mkdir()
  _zip_davis(str(src), str(archives / archive))
  eval_data = _eval_data(
      test_config,
      "tfds_davis",
      archives,
      tfds_data_dir=str(tmp_path / "tfds"),
      resolution=resolution,
  )
  refs = video_sources.list_videos(eval_data)
  assert [r.name for r in refs] == sorted(NAMES)
  prepared = refs[0].path
  assert os.path.isfile(os.path.join(prepared, "dataset_info.json"))
  assert prepared.startswith(str(tmp_path / "tfds" / "davis" / resolution))
  # The extracted copy of the archive is removed after the build.
  assert sorted(os.listdir(tmp_path / "tfds")) == ["davis"]
  for ref in refs:
    video = video_sources.load_video(ref, eval_data)
    v = NAMES.index(ref.name)
    assert video.name == ref.name
    assert video.frame_names == [f"{t:05d}" for t in range(4)]
    for t in range(4):
      path = os.path.join(root, "JPEGImages", folder, ref.name, f"{t:05d}.jpg")
      with open(path, "rb") as f:
        assert video.frame_bytes[t] == f.read()
      np.testing.assert_array_equal(video.frames[t], iio.imread(path))
      np.testing.assert_array_equal(video.labels[t], _ids(t, v))
    np.testing.assert_array_equal(video.has_label, [True] * 4)
    assert video.num_objects == 2
    np.testing.assert_array_equal(video.object_first_frame, [0, 0])
  # A second listing reuses the prepared dataset: no archive needed.
  os.remove(archives / archive)
  assert video_sources.list_videos(eval_data) == refs


def test_tfds_davis_missing_archive(tmp_path, test_config):
  eval_data = _eval_data(test_config, "tfds_davis", tmp_path)
  with pytest.raises(
      video_sources.InputError,
      match="DAVIS-2017-trainval-480p.zip: archive is missing.*download",
  ):
    video_sources.list_videos(eval_data)


def test_tfds_davis_archive_with_a_gap(tmp_path, test_config):
  src = tmp_path / "src"
  root = _davis(str(src / "DAVIS"), names=("bear",))
  os.remove(os.path.join(root, "JPEGImages", "480p", "bear", "00002.jpg"))
  os.remove(os.path.join(root, "Annotations", "480p", "bear", "00002.png"))
  zip_path = str(tmp_path / "DAVIS-2017-trainval-480p.zip")
  _zip_davis(str(src), zip_path)
  eval_data = _eval_data(test_config, "tfds_davis", tmp_path)
  with pytest.raises(video_sources.InputError) as error:
    video_sources.list_videos(eval_data)
  # Named as the archive member, not the temporary extraction folder.
  assert f"{zip_path}:DAVIS/JPEGImages/480p/bear/00002.jpg" in str(error.value)
  assert "missing" in str(error.value)


def _mask_file(path, ids):
  iio.imwrite(path, np.asarray(ids, np.uint8))
  return str(path)


def test_own_video_frames_folder(tmp_path, test_config):
  folder = tmp_path / "clip"
  folder.mkdir()
  # Natural order: frame2 before frame10.
  for t, name in enumerate(["frame1", "frame2", "frame10", "frame11"]):
    iio.imwrite(folder / f"{name}.png", _frame(t))
  (folder / "notes.txt").write_text("not a frame")
  mask = _mask_file(tmp_path / "mask.png", np.where(_ids(0) == 1, 255, 0))
  eval_data = _eval_data(test_config, "video", folder, mask=mask)
  video = _load_all(eval_data)["clip"]
  assert video.frame_names == ["frame1", "frame2", "frame10", "frame11"]
  for t in range(4):
    np.testing.assert_array_equal(video.frames[t], _frame(t))
  assert video.frame_bytes[2] == (folder / "frame10.png").read_bytes()
  # A binary 0/255 mask is one object.
  assert video.num_objects == 1
  np.testing.assert_array_equal(video.labels[0], _ids(0) == 1)
  np.testing.assert_array_equal(video.has_label, [True, False, False, False])
  assert not video.labels[1:].any()
  np.testing.assert_array_equal(video.object_first_frame, [0])


def test_own_video_resize(tmp_path, test_config):
  folder = tmp_path / "clip"
  folder.mkdir()
  for t in range(3):
    iio.imwrite(folder / f"{t:05d}.png", _frame(t))
  ids = _ids(0)
  ids[0] = 0
  mask = str(tmp_path / "mask.png")
  video_sources.write_palette_mask(mask, ids)
  eval_data = _eval_data(
      test_config, "video", folder, mask=mask, resize_height=12
  )
  video = _load_all(eval_data)["clip"]
  assert video.frames.shape == (3, 12, 20, 3)
  assert video.labels.shape == (3, 12, 20)
  assert video.original_size == (H, W)
  assert video.frame_bytes == [None] * 3
  assert video.num_objects == 2
  # Nearest neighbour at pixel centres: output i samples input 2 i + 1.
  np.testing.assert_array_equal(video.labels[0], ids[1::2, 1::2])
  # Inside the block (rows 4..11, columns 5..14) the colour stays.
  np.testing.assert_array_equal(video.frames[0, 4, 4], (250, 30, 30))


@pytest.mark.parametrize(
    "suffix, codec", [(".mp4", "libx264"), (".avi", "mpeg4")]
)
def test_own_video_file(tmp_path, test_config, suffix, codec):
  path = str(tmp_path / f"My Clip{suffix}")
  frames = [_frame(t) for t in range(5)]
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "5"}
    else:
      stream.options = {"qscale": "2"}
    for frame in frames:
      packets = stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
      container.mux(packets)
    container.mux(stream.encode())
  mask = _mask_file(tmp_path / "mask.png", (_ids(0) == 1).astype(np.uint8))
  eval_data = _eval_data(test_config, "video", path, mask=mask)
  refs = video_sources.list_videos(eval_data)
  assert [r.name for r in refs] == ["My Clip"]
  video = video_sources.load_video(refs[0], eval_data)
  assert video.frame_names == [f"{t:05d}" for t in range(5)]
  assert video.frames.shape == (5, H, W, 3)
  assert video.frame_bytes == [None] * 5
  # Lossy: close on average, and each frame nearest its own source frame.
  for t in range(5):
    errors = [np.abs(video.frames[t] - f.astype(float)).mean() for f in frames]
    assert errors[t] < 12, errors
    assert int(np.argmin(errors)) == t
  assert video.num_objects == 1
  np.testing.assert_array_equal(video.labels[0], _ids(0) == 1)


def test_palette_mask_round_trip(tmp_path):
  ids = np.arange(H * W).reshape(H, W).astype(np.uint8)
  ids[0, 0] = 255
  path = str(tmp_path / "m.png")
  video_sources.write_palette_mask(path, ids)
  np.testing.assert_array_equal(video_sources.read_palette_mask(path), ids)
  with Image.open(path) as image:
    assert image.mode == "P"
    palette = np.array(image.getpalette()[: 3 * 256]).reshape(256, 3)
  np.testing.assert_array_equal(palette, masks.davis_palette())
  assert os.listdir(tmp_path) == ["m.png"]  # No temporary file left.


def test_rgb_mask_in_palette_colours_is_converted(tmp_path):
  ids = _ids(0)
  path = str(tmp_path / "rgb.png")
  iio.imwrite(path, masks.davis_palette()[ids])
  np.testing.assert_array_equal(video_sources.read_palette_mask(path), ids)


# ----------------------------------------------------------------------------
# Bad input: each names the file, the problem and the fix.


def _truncate_jpeg(root):
  path = os.path.join(root, "JPEGImages", "480p", "car", "00002.jpg")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _wrong_mask_size(root):
  path = os.path.join(root, "Annotations", "480p", "car", "00001.png")
  video_sources.write_palette_mask(path, np.zeros((H, W + 2), np.uint8))


def _rgb_mask(root):
  path = os.path.join(root, "Annotations", "480p", "car", "00001.png")
  rgb = masks.davis_palette()[_ids(1)]
  rgb[3:6, 3:6] = (12, 200, 7)
  iio.imwrite(path, rgb)


def _empty_first_mask(root):
  path = os.path.join(root, "Annotations", "480p", "car", "00000.png")
  ids = np.zeros((H, W), np.uint8)
  ids[0] = 255
  video_sources.write_palette_mask(path, ids)


def _frame_gap(root):
  os.remove(os.path.join(root, "JPEGImages", "480p", "car", "00002.jpg"))
  os.remove(os.path.join(root, "Annotations", "480p", "car", "00002.png"))


def _stray_annotation(root):
  os.remove(os.path.join(root, "JPEGImages", "480p", "car", "00003.jpg"))


def _many_objects(root):
  path = os.path.join(root, "Annotations", "480p", "car", "00000.png")
  ids = _ids(0, 1)
  ids[20:, :] = 7
  video_sources.write_palette_mask(path, ids)


def _later_unknown_id(root):
  path = os.path.join(root, "Annotations", "480p", "car", "00003.png")
  ids = _ids(3, 1)
  ids[20:, :] = 3
  video_sources.write_palette_mask(path, ids)


@pytest.mark.parametrize(
    "breaker, file, problem, fix",
    [
        (_truncate_jpeg, "car/00002.jpg", "truncated", "re-extract"),
        (_wrong_mask_size, "car/00001.png", "42x24 px .* 40x24 px", "size"),
        (_rgb_mask, "car/00001.png", r"\(12, 200, 7\) x9 px", "palette"),
        (_empty_first_mask, "car/00000.png", "no object", "at least one"),
        (_frame_gap, "car/00002.jpg", "missing.*jumps to 00003", "renumber"),
        (_stray_annotation, "car/00003.png", "without a frame", "restore"),
        (_many_objects, "car/00000.png", "7 objects.* is 4", "max_objects"),
        (_later_unknown_id, "car/00003.png", "object id 3", "first-frame"),
    ],
)
def test_davis_bad_input(tmp_path, test_config, breaker, file, problem, fix):
  root = _davis(str(tmp_path / "DAVIS"))
  breaker(root)
  eval_data = _eval_data(test_config, "davis", root, max_objects=4)
  refs = {r.name: r for r in video_sources.list_videos(eval_data)}
  video_sources.load_video(refs["bear"], eval_data)  # Unbroken.
  with pytest.raises(
      video_sources.InputError, match=f"{file}: .*{problem}.*Fix: .*{fix}"
  ):
    video_sources.load_video(refs["car"], eval_data)


def test_missing_split_file(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"))
  eval_data = _eval_data(test_config, "davis", root, split="test-dev")
  with pytest.raises(
      video_sources.InputError,
      match=r"ImageSets/2017/test-dev.txt: .*missing.*found .*train.txt",
  ):
    video_sources.list_videos(eval_data)


def test_missing_video_folder_listed_in_split(tmp_path, test_config):
  root = _davis(str(tmp_path / "DAVIS"))
  shutil.rmtree(os.path.join(root, "JPEGImages", "480p", "dog"))
  eval_data = _eval_data(test_config, "davis", root)
  with pytest.raises(
      video_sources.InputError,
      match=r"JPEGImages/480p/dog: .*listed in .*val.txt.*Fix",
  ):
    video_sources.list_videos(eval_data)


def test_missing_dataset_folders(tmp_path, test_config):
  eval_data = _eval_data(test_config, "davis", tmp_path)
  with pytest.raises(
      video_sources.InputError, match="JPEGImages/480p: folder is missing"
  ):
    video_sources.list_videos(eval_data)
  eval_data = _eval_data(test_config, "youtube_vos", tmp_path, split="valid")
  with pytest.raises(
      video_sources.InputError, match="valid/JPEGImages: folder is missing"
  ):
    video_sources.list_videos(eval_data)


def test_own_video_bad_mask_and_file(tmp_path, test_config):
  folder = tmp_path / "clip"
  folder.mkdir()
  for t in range(2):
    iio.imwrite(folder / f"{t:05d}.jpg", _frame(t))
  small = _mask_file(tmp_path / "small.png", np.ones((H // 2, W), np.uint8))
  eval_data = _eval_data(test_config, "video", folder, mask=small)
  (ref,) = video_sources.list_videos(eval_data)
  with pytest.raises(video_sources.InputError, match="small.png: is 40x12"):
    video_sources.load_video(ref, eval_data)
  # Ids 1 and 3: object 2 has no pixel.
  ids = np.zeros((H, W), np.uint8)
  ids[:5, :5], ids[10:, 10:] = 1, 3
  gap = _mask_file(tmp_path / "gap.png", ids)
  eval_data = _eval_data(test_config, "video", folder, mask=gap)
  (ref,) = video_sources.list_videos(eval_data)
  with pytest.raises(
      video_sources.InputError, match=r"ids \[2\] have no pixel"
  ):
    video_sources.load_video(ref, eval_data)
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(b"\x00not a video" * 50)
  eval_data = _eval_data(test_config, "video", broken, mask=gap)
  (ref,) = video_sources.list_videos(eval_data)
  with pytest.raises(
      video_sources.InputError, match="broken.mp4: cannot be decoded.*Fix"
  ):
    video_sources.load_video(ref, eval_data)
  eval_data = _eval_data(
      test_config, "video", folder, mask=str(tmp_path / "none.png")
  )
  with pytest.raises(video_sources.InputError, match="none.png.*not a file"):
    video_sources.list_videos(eval_data)


def test_truncated_mask_png(tmp_path):
  path = str(tmp_path / "m.png")
  video_sources.write_palette_mask(path, _ids(0))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(
      video_sources.InputError, match="m.png: is not a readable"
  ):
    video_sources.read_palette_mask(path)
