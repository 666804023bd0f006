"""Importers on fixtures written here in the exact upstream formats, against hand-checked graphs."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from sgmodel.data.coco import COCOOptions, coco_relations, iter_coco
from sgmodel.data.sg2im import iter_sg2im
from sgmodel.data.visual_genome import VGOptions, iter_visual_genome
from sgmodel.graph import SceneGraph, SceneGraphError, SGObject, SGRelation


def write_json(path, data, **kwargs) -> str:
    path.write_text(json.dumps(data, **kwargs))
    return str(path)


def split(items):
    graphs, errors, extras = [], [], []
    for item in items:
        if isinstance(item, tuple):
            item, extra = item
            extras.append(extra)
        (graphs if isinstance(item, SceneGraph) else errors).append(item)
    return graphs, errors, extras


# ----------------------------------------------------------------------------- sg2im


SHEEP = [  # sg2im's scene_graphs/figure_6_sheep.json, first three graphs
    {"objects": ["sky", "grass", "zebra"], "relationships": [[0, "above", 1], [2, "standing on", 1]]},
    {"objects": ["sky", "grass", "sheep"], "relationships": [[0, "above", 1], [2, "standing on", 1]]},
    {"objects": ["sky", "grass", "sheep", "sheep"], "relationships": [[0, "above", 1], [2, "standing on", 1], [3, "by", 2]]},
]


def test_sg2im_list_with_string_objects(tmp_path):
    graphs, errors, _ = split(iter_sg2im(write_json(tmp_path / "sheep.json", SHEEP, indent=2)))
    assert errors == []
    assert [g.id for g in graphs] == ["0", "1", "2"]  # ids from positions
    assert graphs[2] == SceneGraph(
        id="2",
        objects=(SGObject("sky"), SGObject("grass"), SGObject("sheep"), SGObject("sheep")),
        relations=(SGRelation(0, "above", 1), SGRelation(2, "standing on", 1), SGRelation(3, "by", 2)),
    )


def test_sg2im_single_graph_with_dict_objects_and_ids(tmp_path):
    graph = {
        "id": "kitchen",
        "objects": [
            {"label": "table", "attributes": ["wooden"], "box": [0.1, 0.5, 0.9, 1.0]},
            "cup",
            {"label": "window"},
        ],
        "relationships": [[1, "on", 0], {"subject": 2, "predicate": "behind", "object": 0}],
        "caption": "a kitchen",
        "seed": 3,
    }
    (g,) = list(iter_sg2im(write_json(tmp_path / "one.json", graph)))
    assert g == SceneGraph(
        id="kitchen",
        objects=(SGObject("table", ("wooden",), (0.1, 0.5, 0.9, 1.0)), SGObject("cup"), SGObject("window")),
        relations=(SGRelation(1, "on", 0), SGRelation(2, "behind", 0)),
        caption="a kitchen",
        seed=3,
    )


def test_sg2im_bad_graphs_become_errors_and_the_rest_imports(tmp_path):
    data = [
        {"objects": ["a", "b"], "relationships": [[0, "on", 5]]},
        {"objects": ["a", "b"], "relationship": [[0, "on", 1]]},  # typo'd key
        {"objects": ["a", "b"], "relationships": [[0, "on"]]},
        {"objects": [], "relationships": []},
        "not a graph",
        {"id": "fine", "objects": ["a"], "relations": []},
    ]
    items = list(iter_sg2im(write_json(tmp_path / "mixed.json", data)))
    assert len(items) == 6
    graphs, errors, _ = split(items)
    assert [g.id for g in graphs] == ["fine"]
    assert [(e.row_id, e.code) for e in errors] == [
        ("0", "relation_index_out_of_range"),
        ("1", "unknown_field"),
        ("2", "bad_relation"),
        ("3", "no_objects"),
        ("4", "bad_type"),
    ]
    assert "relationship" in str(errors[1]) and "[[0, 'on', 1]]" in str(errors[1])


def test_sg2im_invalid_json_keeps_earlier_graphs_and_names_the_position(tmp_path):
    path = tmp_path / "broken.json"
    text = '[\n  {"objects": ["a", "b"], "relationships": [[0, "on", 1]]},\n  {"objects": ["c" "d"]}\n]\n'
    path.write_text(text)
    pos = text.index('"d"')  # the missing comma: line 3, column 20
    assert (pos, pos - text.rfind("\n", 0, pos)) == (81, 20)
    with pytest.raises(json.JSONDecodeError, match=r"line 3 column 20 \(char 81\)"):
        json.loads(text)  # where the standard library puts it too
    items = list(iter_sg2im(str(path)))
    assert isinstance(items[0], SceneGraph) and items[0].objects[0].label == "a"
    err = items[1]
    assert isinstance(err, SceneGraphError) and err.code == "invalid_json"
    assert str(path) in str(err)
    assert "line 3 column 20 (char 81)" in str(err)
    assert len(items) == 2


def test_sg2im_reads_open_binary_files(tmp_path):
    path = write_json(tmp_path / "s.json", SHEEP)
    with open(path, "rb") as handle:
        graphs, errors, _ = split(iter_sg2im(handle, name="s3://bucket/s.json"))
    assert len(graphs) == 3 and not errors


# ----------------------------------------------------------------------------- Visual Genome


def vg_object(object_id, name, x, y, w, h, **extra):
    return {"object_id": object_id, "x": x, "y": y, "w": w, "h": h, "names": [name], "synsets": [f"{name}.n.01"], **extra}


def vg_rel(rel_id, subject_id, predicate, object_id):
    return {"relationship_id": rel_id, "predicate": predicate, "synsets": [], "subject_id": subject_id, "object_id": object_id}


@pytest.fixture
def vg_files(tmp_path):
    """scene_graphs.json, image_data.json and attributes.json as Visual Genome v1.4 ships them."""
    scene_graphs = [
        {
            "image_id": 1,
            "objects": [
                vg_object(10, "sky", 0, 0, 800, 200),
                vg_object(11, "grass", 0, 300, 800, 300),
                vg_object(12, "sheep", 100, 350, 200, 150),
                vg_object(13, "flower", 500, 500, 20, 20),  # under 32 px: dropped
                vg_object(14, "tree", 700, 100, 150, 400),  # runs past the right edge: clipped
            ],
            "relationships": [
                vg_rel(100, 10, "ABOVE ", 11),  # sg2im lowercases and strips predicates
                vg_rel(101, 12, "standing on", 11),
                vg_rel(102, 13, "in", 11),  # its subject was dropped
                vg_rel(103, 12, "near", 999),  # names an object that does not exist
                {"relationship_id": 104, "predicate": "behind", "subject": {"object_id": 14}, "object": {"object_id": 12}},
            ],
        },
        {  # two objects only: rejected by min_objects_per_image=3
            "image_id": 2,
            "objects": [vg_object(20, "cat", 0, 0, 100, 100), vg_object(21, "sofa", 0, 100, 300, 100)],
            "relationships": [vg_rel(200, 20, "on", 21)],
        },
        {  # objects but no relationship left: rejected by min_relations_per_image=1
            "image_id": 3,
            "objects": [vg_object(30 + i, "car", 40 * i, 0, 40, 40) for i in range(3)],
            "relationships": [vg_rel(300, 30, "near", 77)],
        },
        {  # a 150 px tall image: under sg2im's min_image_size 200
            "image_id": 4,
            "objects": [vg_object(40 + i, "dog", 0, 0, 50, 50) for i in range(3)],
            "relationships": [vg_rel(400, 40, "near", 41)],
        },
    ]
    image_data = [
        {"width": 800, "height": 600, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "coco_id": None,
         "flickr_id": None, "image_id": 1},
        {"width": 640, "height": 480, "url": "u2", "coco_id": None, "flickr_id": None, "image_id": 2},
        {"width": 640, "height": 480, "url": "u3", "coco_id": None, "flickr_id": None, "image_id": 3},
        {"width": 300, "height": 150, "url": "u4", "coco_id": None, "flickr_id": None, "image_id": 4},
    ]
    attributes = [
        {"image_id": 1, "attributes": [
            {"object_id": 11, "names": ["grass"], "x": 0, "y": 300, "w": 800, "h": 300, "attributes": ["green", " Lush ", "green"]},
            {"object_id": 12, "names": ["sheep"], "x": 100, "y": 350, "w": 200, "h": 150, "attributes": ["white"]},
            {"object_id": 10, "names": ["sky"], "x": 0, "y": 0, "w": 800, "h": 200},
        ]},
        {"image_id": 3, "attributes": []},
    ]
    return {
        "scene_graphs": write_json(tmp_path / "scene_graphs.json", scene_graphs),
        "image_data": write_json(tmp_path / "image_data.json", image_data),
        "attributes": write_json(tmp_path / "attributes.json", attributes),
    }


def test_vg_hand_checked_graph_with_sizes_and_attributes(vg_files):
    stats: Counter = Counter()
    items = list(iter_visual_genome(
        vg_files["scene_graphs"], image_data=vg_files["image_data"], attributes=vg_files["attributes"], stats=stats
    ))
    assert len(items) == 4  # one item per image: nothing disappears
    graphs, errors, _ = split(items)
    (g,) = graphs
    assert g.id == "1"
    assert [o.label for o in g.objects] == ["sky", "grass", "sheep", "tree"]
    assert g.objects[0].box == pytest.approx((0.0, 0.0, 1.0, 200 / 600))
    assert g.objects[1].box == pytest.approx((0.0, 0.5, 1.0, 1.0))
    assert g.objects[2].box == pytest.approx((100 / 800, 350 / 600, 300 / 800, 500 / 600))
    assert g.objects[3].box == pytest.approx((700 / 800, 100 / 600, 1.0, 500 / 600))  # clipped at x = 1
    assert [o.attributes for o in g.objects] == [(), ("green", "Lush"), ("white",), ()]
    assert g.relations == (
        SGRelation(0, "above", 1),
        SGRelation(2, "standing on", 1),
        SGRelation(3, "behind", 2),
    )
    assert [(e.row_id, e.code) for e in errors] == [
        ("2", "filtered_few_objects"),
        ("3", "filtered_few_relations"),
        ("4", "filtered_small_image"),
    ]
    assert "--min-objects-per-image 3" in str(errors[0])
    assert stats["objects_too_small"] == 1  # the flower (image 4 is rejected before its objects are read)
    assert stats["relationships_to_dropped_object"] == 1
    assert stats["relationships_missing_object"] == 2  # image 1's "near 999" and image 3's "near 77"
    assert stats["boxes_clipped"] == 1


def test_vg_without_image_data_has_no_boxes(vg_files):
    stats: Counter = Counter()
    graphs, errors, _ = split(iter_visual_genome(vg_files["scene_graphs"], stats=stats))
    assert [g.id for g in graphs] == ["1", "4"]  # image 4's size is unknown, so min_image_size cannot apply
    assert all(o.box is None for g in graphs for o in g.objects)
    assert stats["images_without_size"] == 4


def test_vg_filters_are_options(vg_files):
    loose = VGOptions(min_object_size=0, min_objects_per_image=1, min_relations_per_image=0, min_image_size=0)
    stats: Counter = Counter()
    graphs, errors, _ = split(iter_visual_genome(
        vg_files["scene_graphs"], image_data=vg_files["image_data"], options=loose, stats=stats
    ))
    assert errors == []
    assert [g.id for g in graphs] == ["1", "2", "3", "4"]
    assert [o.label for o in graphs[0].objects] == ["sky", "grass", "sheep", "flower", "tree"]
    assert SGRelation(3, "in", 1) in graphs[0].relations
    strict = VGOptions(max_objects_per_image=3, max_relations_per_image=1)
    _, errors, _ = split(iter_visual_genome(vg_files["scene_graphs"], image_data=vg_files["image_data"], options=strict))
    assert errors[0].row_id == "1" and errors[0].code == "filtered_many_objects"
    with pytest.raises(ValueError, match="min_object_size"):
        VGOptions(min_object_size=-1)


def test_vg_counts_dropped_relationships(tmp_path):
    image = {
        "image_id": 7,
        "objects": [vg_object(1, "a", 0, 0, 50, 50), vg_object(2, "b", 0, 0, 50, 50), vg_object(3, "c", 0, 0, 50, 50),
                    vg_object(4, "", 0, 0, 50, 50)],
        "relationships": [
            vg_rel(1, 1, "on", 2),
            vg_rel(2, 1, "on", 42),  # missing object
            vg_rel(3, 43, "on", 44),  # missing both
            vg_rel(4, 3, "", 1),  # no predicate
            vg_rel(5, 2, "near", 2),  # object to itself
            vg_rel(6, 4, "near", 1),  # to an object dropped for having no name
        ],
    }
    stats: Counter = Counter()
    (g,) = list(iter_visual_genome(write_json(tmp_path / "sg.json", [image]), stats=stats))
    assert g.relations == (SGRelation(0, "on", 1),)
    assert stats == Counter({
        "relationships_missing_object": 2, "relationships_without_predicate": 1, "relationships_self": 1,
        "relationships_to_dropped_object": 1, "objects_without_name": 1, "images_without_size": 1,
    })


def test_vg_malformed_images_are_errors_not_crashes(tmp_path):
    data = [
        {"objects": [], "relationships": []},  # no image_id
        {"image_id": 5, "objects": [{"object_id": 1, "x": "left", "y": 0, "w": 1, "h": 1, "names": ["a"]}]},
        {"image_id": [6], "objects": []},
        17,
    ]
    items = list(iter_visual_genome(write_json(tmp_path / "sg.json", data)))
    assert [(e.row_id, e.field, e.code) for e in items] == [
        (None, "[0].image_id", "bad_id"),
        ("5", "objects[0].x", "bad_type"),
        (None, "[2].image_id", "bad_id"),
        (None, "[3]", "bad_type"),
    ]
    assert "'left'" in str(items[1])


def test_vg_invalid_json_position(tmp_path):
    good = {"image_id": 1, "objects": [vg_object(i, "x", 0, 0, 50, 50) for i in range(3)],
            "relationships": [vg_rel(1, 0, "on", 1)]}
    text = json.dumps([good]).rstrip("]") + ', {"image_id": 2, "objects": [}]'
    path = tmp_path / "scene_graphs.json"
    path.write_text(text)
    items = list(iter_visual_genome(str(path)))
    assert isinstance(items[0], SceneGraph)
    assert items[1].code == "invalid_json"
    pos = text.index("[}") + 1
    assert f"line 1 column {pos + 1} (char {pos})" in str(items[1])
    assert "scene_graphs.json" in str(items[1])
    # invalid JSON in a side file is reported the same way
    bad_side = tmp_path / "image_data.json"
    bad_side.write_text('[{"image_id": 1, "width": 10 "height": 10}]')
    items = list(iter_visual_genome(str(tmp_path / "scene_graphs.json"), image_data=str(bad_side)))
    assert items[0].code == "invalid_json" and "image_data.json" in str(items[0])


def test_vg_side_files_joined_within_the_lookahead_window(tmp_path):
    images = [
        {"image_id": i, "objects": [vg_object(1, "a", 0, 0, 50, 50), vg_object(2, "b", 0, 0, 50, 50)],
         "relationships": [vg_rel(1, 1, "on", 2)]}
        for i in range(1, 7)
    ]
    sizes = [{"image_id": i, "width": 100 * i, "height": 100} for i in (2, 1, 4, 3, 6)]  # shuffled; 5 missing
    stats: Counter = Counter()
    graphs, errors, _ = split(iter_visual_genome(
        write_json(tmp_path / "sg.json", images), image_data=write_json(tmp_path / "img.json", sizes),
        options=VGOptions(min_objects_per_image=2, min_image_size=0), stats=stats,
    ))
    assert not errors
    widths = {g.id: g.objects[0].box for g in graphs}
    assert widths["1"] == pytest.approx((0, 0, 0.5, 0.5))
    assert widths["3"] == pytest.approx((0, 0, 50 / 300, 0.5))
    assert widths["6"] == pytest.approx((0, 0, 50 / 600, 0.5))
    assert widths["5"] is None
    assert stats["images_not_in_image_data"] == 1


# ----------------------------------------------------------------------------- COCO-Stuff


def coco_ann(ann_id, image_id, category_id, bbox, polygon=True):
    x, y, w, h = bbox
    segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]] if polygon else {"counts": "PPYo0", "size": [100, 200]}
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": w * h,
            "iscrowd": 0, "segmentation": segmentation}


def coco_image(image_id, width=200, height=100):
    return {"license": 1, "file_name": f"{image_id:012d}.jpg", "coco_url": "", "height": height, "width": width,
            "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": image_id}


INSTANCE_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "sports", "id": 34, "name": "frisbee"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
]
STUFF_CATEGORIES = [
    {"supercategory": "sky", "id": 157, "name": "sky-other"},
    {"supercategory": "plant", "id": 124, "name": "grass"},
    {"supercategory": "other", "id": 183, "name": "other"},
]
# Image 1 (200 x 100) keeps person, dog, sky-other, grass. Centres: person (0.2, 0.6), dog (0.8, 0.7),
# sky (0.5, 0.2), grass (0.5, 0.6). Worked by hand with sg2im's rule (y grows downwards):
EXPECTED_PREDICATE = {
    ("person", "dog"): "left of",  # d = (-0.6, -0.1): angle about -170 degrees
    ("dog", "person"): "right of",  # about +10 degrees
    ("person", "sky-other"): "below",  # d = (-0.3, 0.4): about 127 degrees
    ("sky-other", "person"): "above",  # about -53 degrees
    ("person", "grass"): "inside",  # (0.1, 0.3, 0.3, 0.9) within (0, 0.2, 1, 1)
    ("grass", "person"): "surrounding",
    ("dog", "sky-other"): "below",  # d = (0.3, 0.5): about 59 degrees
    ("sky-other", "dog"): "above",
    ("dog", "grass"): "inside",  # (0.7, 0.5, 0.9, 0.9) within (0, 0.2, 1, 1)
    ("grass", "dog"): "surrounding",
    ("sky-other", "grass"): "above",  # shared left edge: no containment; d = (0, -0.4): -90 degrees
    ("grass", "sky-other"): "below",
}


@pytest.fixture
def coco_files(tmp_path):
    instances = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "", "id": 1, "name": "x"}],
        "images": [coco_image(1), coco_image(2), coco_image(3), coco_image(4)],
        "annotations": [
            coco_ann(1, 1, 1, [20, 30, 40, 60]),  # person: 12% of the image
            coco_ann(2, 1, 18, [140, 50, 40, 40]),  # dog: 8%
            coco_ann(3, 1, 34, [100, 10, 10, 10]),  # frisbee: 0.5%, dropped
            coco_ann(4, 1, 3, [0, 0, 40, 10]),  # car: exactly 2%, dropped (sg2im keeps > 2%)
            coco_ann(5, 2, 1, [0, 0, 100, 100]),  # image 2: only two objects in all
            coco_ann(6, 99, 1, [0, 0, 10, 10]),  # an image that is not in the file
            *[coco_ann(10 + i, 3, 3, [20 * i, 0, 20, 50]) for i in range(9)],  # image 3: nine cars
            coco_ann(30, 4, 1, [0, 0, 100, 100]),
            coco_ann(31, 4, 18, [100, 0, 100, 100]),
            coco_ann(32, 4, 3, [0, 50, 200, 50]),  # image 4: no stuff annotations
        ],
        "categories": INSTANCE_CATEGORIES,
    }
    stuff = {
        "info": instances["info"],
        "images": instances["images"][:3],
        "annotations": [
            coco_ann(101, 1, 157, [0, 0, 200, 40], polygon=False),
            coco_ann(102, 1, 124, [0, 20, 200, 80], polygon=False),
            coco_ann(103, 1, 183, [0, 0, 200, 100], polygon=False),  # 'other': dropped
            coco_ann(104, 2, 124, [0, 50, 200, 50], polygon=False),
            coco_ann(105, 3, 157, [0, 0, 200, 50], polygon=False),
        ],
        "categories": STUFF_CATEGORIES,
    }
    return write_json(tmp_path / "instances.json", instances), write_json(tmp_path / "stuff.json", stuff)


def test_coco_hand_checked_graph_and_relation_geometry(coco_files):
    instances, stuff = coco_files
    stats: Counter = Counter()
    items = list(iter_coco(instances, stuff=stuff, options=COCOOptions(seed=0), stats=stats))
    assert len(items) == 4  # one item per image
    graphs, errors, extras = split(items)
    (g,) = graphs
    assert g.id == "1" and extras == [{"file_name": "000000000001.jpg"}]
    labels = [o.label for o in g.objects]
    assert labels == ["person", "dog", "sky-other", "grass"]  # instances first, then stuff
    assert [o.box for o in g.objects] == [
        pytest.approx((0.1, 0.3, 0.3, 0.9)),
        pytest.approx((0.7, 0.5, 0.9, 0.9)),
        pytest.approx((0.0, 0.0, 1.0, 0.4)),
        pytest.approx((0.0, 0.2, 1.0, 1.0)),
    ]
    assert len(g.relations) == 4  # one triple per object, as sg2im builds them
    for i, r in enumerate(g.relations):
        assert i in (r.subject, r.object)
        assert r.predicate == EXPECTED_PREDICATE[(labels[r.subject], labels[r.object])]
    assert [(e.row_id, e.code) for e in errors] == [
        ("2", "filtered_few_objects"),
        ("3", "filtered_many_objects"),
        ("4", "filtered_no_stuff"),
    ]
    assert stats["objects_too_small"] == 2
    assert stats["objects_other"] == 1
    assert stats["instances_annotations_unknown_image"] == 1


def test_coco_relation_rule_on_every_ordered_pair():
    boxes = {
        "person": [0.1, 0.3, 0.3, 0.9], "dog": [0.7, 0.5, 0.9, 0.9],
        "sky-other": [0.0, 0.0, 1.0, 0.4], "grass": [0.0, 0.2, 1.0, 1.0],
    }
    from sgmodel.data.geometry import relation_from_boxes

    for (s, o), predicate in EXPECTED_PREDICATE.items():
        assert relation_from_boxes(boxes[s], boxes[o]) == predicate, (s, o)


def test_coco_is_deterministic_per_seed(coco_files):
    instances, stuff = coco_files

    def relations(seed):
        graphs, _, _ = split(iter_coco(instances, stuff=stuff, options=COCOOptions(seed=seed)))
        return graphs[0].relations

    assert relations(0) == relations(0)
    assert relations(5) == relations(5)
    assert len({relations(seed) for seed in range(12)}) > 1  # the seed does change the random choice


def test_coco_relations_follow_sg2im_sampling():
    import random

    boxes = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]]
    rels = coco_relations(boxes, random.Random(1))
    rng = random.Random(1)  # replay sg2im's loop by hand
    for cur, rel in enumerate(rels):
        other = rng.choice([j for j in range(3) if j != cur])
        s, o = (cur, other) if rng.random() > 0.5 else (other, cur)
        assert (rel["subject"], rel["object"]) == (s, o)
    assert coco_relations([[0, 0, 1, 1]], random.Random(0)) == []


def test_coco_options(coco_files):
    instances, stuff = coco_files
    # without the stuff file, images are judged on instances alone: image 4 now has 3 objects
    graphs, errors, _ = split(iter_coco(instances))
    assert [g.id for g in graphs] == ["4"]
    assert {e.row_id: e.code for e in errors} == {"1": "filtered_few_objects", "2": "filtered_few_objects",
                                                  "3": "filtered_many_objects"}
    opts = COCOOptions(include_other=True, stuff_only=False, max_objects_per_image=10, min_object_size=0.0)
    graphs, errors, _ = split(iter_coco(instances, stuff=stuff, options=opts))
    by_id = {g.id: g for g in graphs}
    assert [o.label for o in by_id["1"].objects] == ["person", "dog", "frisbee", "car", "sky-other", "grass", "other"]
    assert set(by_id) == {"1", "3", "4"} and [e.row_id for e in errors] == ["2"]
    opts = COCOOptions(instance_whitelist=("person", "dog"), stuff_whitelist=("grass",), min_objects_per_image=2)
    graphs, _, _ = split(iter_coco(instances, stuff=stuff, options=opts))
    assert [o.label for o in graphs[0].objects] == ["person", "dog", "grass"]
    with pytest.raises(ValueError, match="min_objects_per_image"):
        COCOOptions(min_objects_per_image=5, max_objects_per_image=3)


def test_coco_clips_boxes_past_the_image_edge(tmp_path):
    instances = {
        "images": [coco_image(1)],
        "annotations": [coco_ann(1, 1, 1, [150, 0, 80, 50]), coco_ann(2, 1, 18, [0, 0, 60, 60]),
                        coco_ann(3, 1, 3, [60, 40, 60, 60])],
        "categories": INSTANCE_CATEGORIES,
    }
    stats: Counter = Counter()
    graphs, _, _ = split(iter_coco(write_json(tmp_path / "i.json", instances), stats=stats))
    assert graphs[0].objects[0].box == pytest.approx((0.75, 0.0, 1.0, 0.5))
    assert stats["boxes_clipped"] == 1
    assert all(math.isfinite(v) for o in graphs[0].objects for v in o.box)


def test_coco_invalid_json(tmp_path):
    path = tmp_path / "instances.json"
    text = '{"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [{"id": 1,, }]}'
    path.write_text(text)
    (item,) = list(iter_coco(str(path)))
    assert item.code == "invalid_json"
    pos = text.index(",,") + 1
    assert "instances.json" in str(item) and f"line 1 column {pos + 1} (char {pos})" in str(item)


def test_coco_wrong_shapes_do_not_crash(tmp_path):
    stats: Counter = Counter()
    path = write_json(tmp_path / "odd.json", {"images": 5, "annotations": {"a": 1}, "categories": "x"})
    assert list(iter_coco(path, stats=stats)) == []
    assert stats == Counter({"images_not_a_list": 1, "annotations_not_a_list": 1})
    (item,) = list(iter_coco(write_json(tmp_path / "list.json", [1, 2])))
    assert item.code == "invalid_json" and "Expecting '{'" in str(item)
