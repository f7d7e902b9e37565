"""The curation report: image counts per bucket and class, and a contact sheet per bucket.

`report/counts.csv` has one row per bucket, one column per class plus `total`, and a
final `total` row. `report/contact_sheet_<bucket>.png` shows, per class, its
best-ranked images in a row labelled with the class name.
"""

from __future__ import annotations

import csv
import io

from tasks.images import decode_image

THUMBNAIL_PX = 64
LABEL_WIDTH_PX = 120


def format_counts_table(counts: dict[str, dict[str, int]], class_names: list[str]) -> list[str]:
    """Aligned text lines of the counts table, for logs."""
    header = ["bucket", *class_names, "total"]
    body = [[bucket, *(str(counts[bucket].get(n, 0)) for n in class_names),
             str(sum(counts[bucket].values()))] for bucket in counts]
    body.append(["total", *(str(sum(c.get(n, 0) for c in counts.values())) for n in class_names),
                 str(sum(sum(c.values()) for c in counts.values()))])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
            for row in [header, *body]]


def counts_csv(counts: dict[str, dict[str, int]], class_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["bucket", *class_names, "total"])
    for bucket, by_class in counts.items():
        writer.writerow([bucket, *(by_class.get(n, 0) for n in class_names),
                         sum(by_class.values())])
    writer.writerow(["total", *(sum(c.get(n, 0) for c in counts.values()) for n in class_names),
                     sum(sum(c.values()) for c in counts.values())])
    return buffer.getvalue()


def contact_sheet(images: dict[str, list[bytes]], class_names: list[str], per_class: int,
                  title: str) -> bytes:
    """Render a PNG grid: one row per class with its first `per_class` images as thumbnails."""
    from PIL import Image, ImageDraw

    header_px = 20
    columns = max([1, *(min(len(found), per_class) for found in images.values())])
    width = LABEL_WIDTH_PX + columns * THUMBNAIL_PX
    sheet = Image.new("RGB", (width, header_px + len(class_names) * THUMBNAIL_PX), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for row, class_name in enumerate(class_names):
        top = header_px + row * THUMBNAIL_PX
        label = f"{class_name} ({len(images.get(class_name, []))})"
        draw.text((4, top + THUMBNAIL_PX // 2 - 6), label[:20], fill="black")
        for column, data in enumerate(images.get(class_name, [])[:per_class]):
            thumbnail = decode_image(data)
            thumbnail.thumbnail((THUMBNAIL_PX - 2, THUMBNAIL_PX - 2))
            sheet.paste(thumbnail, (LABEL_WIDTH_PX + column * THUMBNAIL_PX + 1, top + 1))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
