// A minimal chat app on client.js: one room, a message list, a form, the online count and
// the connection state. The page is docs/client.md's example (index.html loads this module
// compiled, or the same code as plain JS); types come from /client.d.ts.
import { ChatClient, CLOSE_CODES, type ChatMessage, type PendingMessage } from '../../../gateway/static/client.js';

const ROOM = 1;
const userId = localStorage.getItem('chat.userId') ?? crypto.randomUUID();
localStorage.setItem('chat.userId', userId);

const list = document.querySelector<HTMLUListElement>('#messages')!;
const form = document.querySelector<HTMLFormElement>('#send')!;
const input = document.querySelector<HTMLInputElement>('#text')!;
const status = document.querySelector<HTMLElement>('#status')!;

const chat = new ChatClient({ userId, userName: 'Alice' });

function show(text: string, id: string): HTMLLIElement {
  const item = document.createElement('li');
  item.dataset.id = id;
  item.textContent = text;
  list.append(item);
  return item;
}

chat.on('message', (m: ChatMessage) => {
  show(`${m.userName}: ${m.content}`, m.id);
});
chat.on('state', (state, info) => {
  status.textContent = `${state} · ${chat.num(ROOM) ?? '?'} online`;
  if (info.code === CLOSE_CODES.SERVICE_RESTART) status.textContent += ' (server restarting)';
});
chat.on('num', (_room, num) => {
  status.textContent = `${chat.state} · ${num} online`;
});

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  const pending: PendingMessage = chat.send(ROOM, text);
  const item = show(`me: ${text} (sending)`, pending.clientMsgId);
  pending.promise.then(
    (id) => {
      item.dataset.id = id;
      item.textContent = `me: ${text}`;
    },
    (err: Error & { code?: string }) => {
      item.textContent = `me: ${text} (not sent: ${err.code ?? err.message})`;
    },
  );
});

chat.connect();
chat.join(ROOM, 'Lobby', { lastId: localStorage.getItem('chat.lastId') });
addEventListener('pagehide', () => {
  const last = chat.lastId(ROOM);
  if (last) localStorage.setItem('chat.lastId', last);
});
