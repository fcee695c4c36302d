"""`make viewer`: lay out OHIF's prebuilt viewer (npm `@ohif/app`, its `dist/`) so that
the node serves it at /viewer/ against its own DICOMweb.

OHIF's dist is built for the site root (PUBLIC_URL "/", absolute asset paths, webpack's
public path "/" compiled into its bundles); this rewrites index.html and the bundles' public
path for /viewer/ and replaces app-config.js with one whose only data
source is the node's /dicom-web (same origin, so no CORS is needed).

    python -m pacsnode.node.viewer_install SOURCE_DIST TARGET_DIR
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

BASE = "/viewer/"

APP_CONFIG = """/* Written by `make viewer` (node/viewer_install.py): OHIF against this node's DICOMweb. */
window.config = {
  name: 'pacsnode',
  routerBasename: '/viewer',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  defaultDataSourceName: 'pacsnode',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacsnode',
      configuration: {
        friendlyName: 'pacsnode',
        name: 'pacsnode',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: false },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def rebase_index(html: str) -> str:
    """Absolute asset paths and PUBLIC_URL of OHIF's index.html, moved under /viewer/."""
    html = re.sub(r'(href|src)="/(?!/)', rf'\1="{BASE}', html)
    return html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{BASE}"')


WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/"'


def rebase_bundle(script: str) -> str:
    """OHIF's bundles load their chunks from webpack's public path, compiled in as "/"
    (window.PUBLIC_URL does not change it): without this, every chunk is asked for at the
    site root and the viewer stops at 'ChunkLoadError'."""
    return script.replace(WEBPACK_PUBLIC_PATH, f'__webpack_require__.p = "{BASE}"')


def install(source: Path, target: Path) -> None:
    if not (source / "index.html").is_file():
        raise SystemExit(f"{source} is not OHIF's dist/ (no index.html)")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    index = target / "index.html"
    index.write_text(rebase_index(index.read_text(encoding="utf-8")), encoding="utf-8")
    (target / "app-config.js").write_text(APP_CONFIG, encoding="utf-8")
    for script in target.glob("*.js"):
        text = script.read_text(encoding="utf-8")
        if WEBPACK_PUBLIC_PATH in text:
            script.write_text(rebase_bundle(text), encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    install(Path(argv[0]), Path(argv[1]))
    print(f"OHIF viewer laid out in {argv[1]}: start a node and open http://127.0.0.1:8042/viewer/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
