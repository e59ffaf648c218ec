// Copies the prebuilt browser files of the pinned npm packages (package.json,
// package-lock.json) into assets/ and their licences into licenses/.
//
//   cd playground && npm ci && node vendor.mjs
//
// The copies are committed: the stacyvm binary embeds them at build time, so
// neither Node.js nor network access is needed to build or serve the page.
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, 'node_modules');

// [package, file inside the package, name under assets/]
const files = [
  ['react', 'umd/react.production.min.js', 'react.production.min.js'],
  ['react-dom', 'umd/react-dom.production.min.js', 'react-dom.production.min.js'],
  ['graphiql', 'graphiql.min.js', 'graphiql.min.js'],
  ['graphiql', 'graphiql.min.css', 'graphiql.min.css'],
  ['graphql-ws', 'umd/graphql-ws.min.js', 'graphql-ws.min.js'],
  ['swagger-ui-dist', 'swagger-ui-bundle.js', 'swagger-ui-bundle.js'],
  ['swagger-ui-dist', 'swagger-ui.css', 'swagger-ui.css'],
];

const pinned = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8')).devDependencies;
mkdirSync(join(here, 'assets'), { recursive: true });
mkdirSync(join(here, 'licenses'), { recursive: true });
for (const pkg of new Set(files.map(([p]) => p))) {
  const { version } = JSON.parse(readFileSync(join(modules, pkg, 'package.json'), 'utf8'));
  if (version !== pinned[pkg]) {
    throw new Error(`${pkg}: node_modules has ${version}, package.json pins ${pinned[pkg]}; run npm ci`);
  }
  const licence = existsSync(join(modules, pkg, 'LICENSE')) ? 'LICENSE' : 'LICENSE.md';
  copyFileSync(join(modules, pkg, licence), join(here, 'licenses', `${pkg}.LICENSE`));
  // Apache-2.0 packages carry a NOTICE that must travel with them.
  if (existsSync(join(modules, pkg, 'NOTICE'))) {
    copyFileSync(join(modules, pkg, 'NOTICE'), join(here, 'licenses', `${pkg}.NOTICE`));
  }
  console.log(`${pkg}@${version}`);
}
// A trailing sourceMappingURL comment is dropped: the .map files are not
// vendored, and a browser's developer tools would otherwise ask for them.
for (const [pkg, from, to] of files) {
  const text = readFileSync(join(modules, pkg, from), 'utf8');
  writeFileSync(join(here, 'assets', to), text.replace(/\n?\/[/*]# sourceMappingURL=[^\n]*\s*$/, '\n'));
  console.log(`  ${pkg}/${from} -> assets/${to}`);
}
